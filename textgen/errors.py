"""The two kinds of failure every command reports, and the one wrapper that reports them.

``TextgenError`` is a mistake in the input (a flag, a file, a prompt): the message says what was
wrong and what to do, the CLIs print it as ``error: ...`` and exit 2. ``RunFailed`` is a run that
could not finish although its input was fine (training diverged, the Ray job failed): exit 1.
Neither ever shows a traceback. Standard library only: every layer imports this module.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

EXIT_USAGE = 2  # a mistake in the input
EXIT_FAILED = 1  # the run failed

T = TypeVar("T")


class TextgenError(ValueError):
    """A mistake in the input; the message says what was wrong and what to do."""


class RunFailed(RuntimeError):
    """A run that could not finish (not the user's mistake); the message says what happened."""


def report_errors(command: Callable[[T], int], args: T) -> int:
    """Run a command; user mistakes and failed runs become one ``error:`` line on stderr."""
    try:
        return command(args)
    except TextgenError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except OSError as e:  # an unreadable or unwritable file named on the command line
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr, flush=True)
        return EXIT_USAGE
