"""The one exception type for mistakes a user can make (bad paths, bad files, bad values).

Command lines catch it and print its message on one line with exit code 2.
"""


class UserInputError(Exception):
    """A problem with what the user asked for, with a message that says how to fix it."""


class CheckpointError(UserInputError):
    """A checkpoint file that is missing, unreadable, unsafe or made for another model."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), to quote inside a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
