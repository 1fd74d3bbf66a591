"""The one error path of every flaxgpt command line: `sys.exit(cli.run(main))`.

A user error (`flaxgpt.errors.UserError`, or an OSError about a file, e.g. a path the user
gave that does not exist) prints ONE line `error: ...` on stderr and exits 2; Ctrl-C outside a
training loop prints one line and exits 130; a closed output pipe (`... | head`) ends quietly
(141). Anything else is a bug in flaxgpt and keeps its traceback. FLAXGPT_DEBUG=1 shows the
traceback of user errors and Ctrl-C too.

`ArgumentParser` is argparse's, with defaults shown in --help and a bad flag reported as one
line (exit 2); `ranged(kind, spec)` makes a flag type that refuses values outside a range
written as in `flaxgpt.config.RANGES` (e.g. ranged(float, "(0, 1]")).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from flaxgpt.config import Range
from flaxgpt.errors import UserError

USER_ERROR = 2  # exit status of a user error (argparse's too)
INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE


def run(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit status, with user errors and Ctrl-C turned into one line on stderr."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        return _report("interrupted (Ctrl-C)", INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return BROKEN_PIPE
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and not _about_a_file(e):
            raise
        return _report(one_line(e), USER_ERROR)


def debug() -> bool:
    """FLAXGPT_DEBUG=1: show tracebacks of user errors too."""
    return os.environ.get("FLAXGPT_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
    """The error's message on one line (a multi-line message joined), naming the file of an OSError."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _about_a_file(e: OSError) -> bool:
    """An OSError a user fixes: a missing, unreadable or misplaced file, or one that names its file."""
    file_errors = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    return isinstance(e, file_errors) or e.filename is not None


def _report(message: str, status: int) -> int:
    if debug():
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default (when it has one worth showing),
    also for a flag without help text."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _worth_showing(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        said = "%(default)" in (action.help or "") or "(default:" in (action.help or "")  # in the help's words
        if said or not _worth_showing(action):
            return action.help or ""
        return super()._get_help_string(action)


def _worth_showing(action: argparse.Action) -> bool:
    unset = action.default is None or action.default is False or action.default in ("", [])  # 0 is a value
    return not unset and action.default is not argparse.SUPPRESS


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit 2), for every flaxgpt CLI."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR)


def ranged(kind: type, spec: str) -> Callable[[str], int | float]:
    """An argparse type: `kind(text)`, refused unless it lies in `spec` (RANGES notation)."""
    allowed = Range.parse(spec, kind)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse
