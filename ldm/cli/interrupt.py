"""Ctrl-C that acts within seconds, even while one long native operation holds the main thread.

Python raises KeyboardInterrupt in the main thread only between bytecodes, so a single convolution or
attention call that runs for minutes would delay it for minutes. While `prompt_interrupt` is active, a
watcher thread learns of SIGINT at once through the signal wakeup fd; if the main thread has not stopped
`grace` seconds later, the watcher says so and ends the process. Every output file is written to a temporary
name and renamed into place (ldm.cli.outputs), so ending the process leaves no half-written image.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

GRACE_SECONDS = 3.0


def _watch(read_fd: int, done: threading.Event, grace: float, exit_code: int, prog: str) -> None:
    while True:
        try:
            received = os.read(read_fd, 64)
        except OSError:
            return
        if done.is_set() or not received:
            return
        if signal.SIGINT in received and not done.wait(grace):
            sys.stderr.write(f"\n{prog}: interrupted (stopped during a long step; the images saved so far are "
                             "complete)\n")
            sys.stderr.flush()
            os._exit(exit_code)


@contextlib.contextmanager
def prompt_interrupt(prog: str, exit_code: int, grace: float = GRACE_SECONDS) -> Iterator[None]:
    """Within this context, Ctrl-C ends the process within `grace` seconds (main thread only; elsewhere it
    changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(read_fd, done, grace, exit_code, prog),
                               name="interrupt-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        os.write(write_fd, b"\0")  # wakes the watcher, which sees `done` and returns
        watcher.join()
        os.close(read_fd)
        os.close(write_fd)
