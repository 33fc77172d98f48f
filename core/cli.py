"""The command-line pieces every entry point shares, free of the project: the parser whose errors are one line, the
mark of the flags a resumed run must repeat, and `run_main`, which turns expected errors into one line on stderr and
an exit status (2: a bad flag, file or dataset; 3: a non-finite loss; 130: Ctrl-C; 1: a crash under torchrun), and
never a traceback for an expected mistake.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from . import processes
from .errors import EXPECTED_ERRORS, NonFiniteLossError


class StageParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (`<prog>: error: ...`), exit status 2, like every other
    expected mistake; `--help` shows the full usage."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def same_on_resume(action: argparse.Action) -> argparse.Action:
    """Mark a flag that shapes a run's trajectory: `--resume` refuses a value other than the interrupted run's.

    Declared where the flag is, `same_on_resume(parser.add_argument('--lr', ...))` or through `SameOnResume`; the
    training engine reads the marks (`resume_flags`), so no list of such flags is kept by hand (docs/DESIGN.md §2.4).
    """
    action.same_on_resume = True
    return action


class SameOnResume:
    """`same = SameOnResume(parser or argument group)`; `same.add_argument(...)` adds the flag there and marks it
    `same_on_resume`."""

    def __init__(self, container):
        self.container = container

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        return same_on_resume(self.container.add_argument(*names, **kwargs))


def resume_flags(parser: argparse.ArgumentParser) -> dict[str, object]:
    """{dest: default} of the flags `parser` marks with `same_on_resume` (its parents' and groups' included).

    A checkpoint whose recorded arguments lack one of them was written before the flag existed, so it ran with
    the flag's default: a resumed run compares against that default.
    """
    return {action.dest: action.default for action in parser._actions if getattr(action, 'same_on_resume', False)}


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message quoting a library error may span several)."""
    return ' '.join(line.strip() for line in str(error).splitlines() if line.strip())


def caused_by_interrupt(error: BaseException) -> bool:
    """True for a KeyboardInterrupt, or an error raised while one was being handled (a library's
    cleanup failing on the way out of an interrupted call hides the Ctrl-C behind its own exception)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(); expected errors become one line on stderr and exit status 2.

    Under torchrun (core.processes) only rank 0 prints; a failure ends each process with at most one line
    (Ctrl-C, bad flags or files and a non-finite loss from rank 0 alone; a crash, or a collective that failed
    because another process stopped, from each process it hit, with its rank), exit status 1 for the latter,
    and torchrun's failure summary gets the error with its traceback.
    """
    processes.quiet_unless_main()
    joined = False
    try:
        main()
        joined = processes.is_distributed()
        processes.teardown()
    except BaseException as error:
        # An interrupt first: an error raised while one was handled (a truncated read reported as an unreadable
        # checkpoint, say) is the interrupt's doing, not the file's.
        if caused_by_interrupt(error):
            leave_interrupted()
        torchrun = processes.launched_world_size() > 1
        for kind, status in ((EXPECTED_ERRORS, 2), (NonFiniteLossError, 3)):
            if isinstance(error, kind):
                processes.record_for_torchrun(error)
                processes.report_error(f'error: {one_line(error)}', same_on_every_process=True)
                if processes.is_distributed():  # its threads would be torn down at finalisation (teardown)
                    processes.leave_process(status)
                sys.exit(status)
        if torchrun and isinstance(error, Exception):
            leave_failed(error)
        raise
    if joined:  # a torchrun process ends without finalisation, where gloo's leftover threads may abort it
        processes.leave_process(0)


def leave_failed(error: Exception) -> None:
    """End a process of a torchrun job after an unexpected error: one line, the traceback to torchrun's summary.

    A collective that failed because another process went away is reported by rank 0 alone. torchrun forwards a
    Ctrl-C to its processes one after the other, so such a failure may be the first sign of an interrupt that is
    about to arrive: it is waited for, briefly, and then reported as the interrupt it is.
    """
    collateral = processes.collective_failed(error)
    if collateral:
        try:
            time.sleep(processes.INTERRUPT_GRACE_S)
        except KeyboardInterrupt:
            leave_interrupted()
    processes.record_for_torchrun(error)
    cause = ' (a collective failed: another process stopped, or --dist_timeout passed)' if collateral else ''
    processes.report_error(f'error: {type(error).__name__}: {one_line(error)}{cause}',
                           same_on_every_process=collateral)
    # Leave at once, as after an interrupt: a collective left unfinished would only add the process group's
    # warnings, and half-started DataLoader iterators their tracebacks, to the one line.
    processes.leave_process(1)


def leave_interrupted() -> None:
    print('interrupted: stopped by the user; checkpoints already written are intact '
          '(stages that save checkpoints continue with --resume)', file=sys.stderr)
    # Leave at once: every file was written atomically, and the interpreter's teardown would only let
    # half-started DataLoader iterators print tracebacks from their destructors.
    processes.leave_process(130)
