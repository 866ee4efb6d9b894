"""The one error/exit contract of every vlmo_fast entry point (the `vlmo-fast` CLI,
`train/pretrain.py`, `train/finetune.py`, `train/evaluate.py`).

Exit codes:

    0  EXIT_OK            the job finished
    2  EXIT_USER_ERROR    bad input: a bad argument, a bad or missing file, bad data; one
                          line `error: <message>` on stderr, no traceback
    3  EXIT_NONFINITE     training stopped on a non-finite loss (`NonFiniteLoss`); one line
                          naming the step and the last good checkpoint
    anything else         a bug: Python's traceback (exit 1)

    def main(argv=None):
        return run_or_exit(run, build_parser().parse_args(argv))

What counts as a user error (`is_user_error`), and why:
- ValueError: every check of an argument's or a file's value raises it, and so do the
  file-level errors built on it: the data layer's `DataError` (bad rows, undecodable
  images), `vlmo_fast.io.CorruptFileError` (truncated, tampered or half-written files),
  `IndexModelMismatchError`, json's `JSONDecodeError`, `UnicodeDecodeError`.
- TypeError raised by one of the package's own checks (a `raise` statement in vlmo_fast: a
  wrongly typed value read from a user's file, a config.json field, a .pth that holds no
  state_dict). A TypeError from an operation (a call with the wrong arguments, an
  unsupported operand) is a bug and keeps its traceback. `VLMO_FAST_TRACEBACK=1` shows the
  traceback of any user error.
- FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
  PermissionError: a path the user named is missing, taken, of the wrong kind or not
  readable. Other OSErrors (disk full, I/O errors) are not input errors: traceback.
- `vlmo_fast.checkpoint.CheckpointMismatchError` (a KeyError: the checkpoint does not fit
  the architecture) and PIL's `DecompressionBombError` (an image whose header claims more
  pixels than Pillow will decode: bad data, whichever layer meets it). Both are matched by
  class only when their module is already imported (an exception cannot come from a module
  that was never loaded), so this module imports neither torch nor PIL.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Tuple, Type, TypeVar

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
TRACEBACK_ENV = "VLMO_FAST_TRACEBACK"

USER_ERRORS: Tuple[Type[BaseException], ...] = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
    NotADirectoryError, PermissionError)
# (module, class name) of user errors defined where importing them here would be heavy or circular
_LAZY_USER_ERRORS = (("vlmo_fast.checkpoint", "CheckpointMismatchError"),
                     ("PIL.Image", "DecompressionBombError"))

T = TypeVar("T")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (entry points exit with EXIT_NONFINITE)."""


def is_user_error(exc: BaseException) -> bool:
    """Bad input rather than a bug (see the module docstring for the set and the reasons)."""
    if isinstance(exc, NonFiniteLoss):
        return False
    if type(exc) is TypeError and not _raised_by_a_check(exc):
        return False
    if isinstance(exc, USER_ERRORS):
        return True
    for module_name, class_name in _LAZY_USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _raised_by_a_check(exc: BaseException) -> bool:
    """Whether a TypeError came from one of vlmo_fast's own input checks (a `raise`
    statement in the package) rather than from an operation that failed: a call with the
    wrong arguments or an unsupported operand is a bug and keeps its traceback."""
    import linecache
    tb = exc.__traceback__
    if tb is None:
        return True     # raised and reported without a traceback: nothing says it is a bug
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    package = os.path.dirname(os.path.abspath(__file__))
    if not os.path.abspath(filename).startswith(package + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def exit_code(exc: BaseException) -> Optional[int]:
    """The exit status an entry point gives `exc`: EXIT_NONFINITE, EXIT_USER_ERROR, or None
    for a bug (let the traceback through)."""
    if isinstance(exc, NonFiniteLoss):
        return EXIT_NONFINITE
    if is_user_error(exc):
        return EXIT_USER_ERROR
    return None


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a multi-line message is joined with ' | ');
    the class name when the message is empty."""
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " | ".join(parts) if parts else type(exc).__name__


def report(exc: BaseException) -> None:
    """Print `error: <message>` on stderr (the format every entry point uses)."""
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)


def run_or_exit(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs), under the exit contract: a user error ends the process with one
    line on stderr and SystemExit(EXIT_USER_ERROR), a `NonFiniteLoss` with SystemExit(
    EXIT_NONFINITE); anything else propagates with its traceback. With the environment
    variable VLMO_FAST_TRACEBACK=1 user errors propagate too (for debugging)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        code = exit_code(exc)
        if code is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        report(exc)
        raise SystemExit(code) from None
