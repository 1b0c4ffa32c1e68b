"""The one exception type for mistakes a user can make (bad paths, bad files, bad values).

Command lines catch it and print its message on one line with exit code 2.
"""
from __future__ import annotations

import pickle
import pickletools
import re
from typing import Optional


class UserInputError(Exception):
    """A problem with what the user asked for, with a message that says how to fix it."""


class CheckpointError(UserInputError):
    """A checkpoint file that is missing, unreadable, unsafe or made for another model."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), to quote inside a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# What torch's weights-only unpickler says when it refuses a pickle. The wording changed across versions:
# "Unsupported class posix.system" (torch < 2.4), "Unsupported global: GLOBAL posix.system was not an allowed
# global by default" (2.4 and later), "Trying to load unsupported GLOBAL posix.system whose module posix is
# blocked" (2.5 and later), "Unsupported operand 149" (an instruction it does not read, here protocol 4's FRAME).
_IMPORTED_NAME = re.compile(r"(?:\bGLOBAL|Unsupported class)\s+([A-Za-z_][\w.]*)")
_OBJECT_NAME = re.compile(r"<(?:class '|(?:built-in )?function |built-in method )([A-Za-z_][\w.]*)")
_OPCODE = re.compile(r"Unsupported operand (\d+)")
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def describe_pickle_refusal(error: BaseException) -> Optional[str]:
    """What a pickle refused by `torch.load(weights_only=True)` asked for, in words ("it asks to call
    posix.system"), or None when `error` is not such a refusal (a truncated, corrupt or non-pickle file)."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) and _WEIGHTS_ONLY_REFUSAL not in text:
        return None
    imported = _IMPORTED_NAME.search(text)
    if imported:
        return f"it asks to call {imported.group(1).rstrip('.')}"
    built = _OBJECT_NAME.search(text)
    if built:
        return f"it asks to build or call {built.group(1).rstrip('.')}"
    opcode = _OPCODE.search(text)
    if opcode:
        instruction = pickletools.code2op.get(chr(int(opcode.group(1))))
        if instruction is None:  # not a pickle instruction at all: the file is not a pickle
            return None
        return f"it uses the pickle instruction {instruction.name}, which loading weights only does not read"
    return "it holds Python objects other than tensors and plain containers"
