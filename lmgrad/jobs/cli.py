"""What every launcher shares: clean errors for bad input, a traceback only when asked."""

from __future__ import annotations

import sys
from typing import Callable

from lmgrad.grads.checks import NonFiniteGradientError
from lmgrad.store.errors import StoreError

# The project's own error types already name the file, line, field or tensor; a traceback adds
# nothing for a user who passed a bad path or a malformed file. TaskDataError, CheckpointError and
# UnsupportedModelError are ValueErrors; a full disk or a missing file is an OSError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, StoreError,
                                                NonFiniteGradientError)


def main_with_clean_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps an absl `main`: a user error prints `error: MESSAGE` alone and exits with status 1;
    `--verbosity=1` (or higher) shows the traceback instead."""

    def wrapped(argv: list[str]) -> None:
        from absl import flags

        try:
            main(argv)
        except USER_ERRORS as e:
            if flags.FLAGS.verbosity >= 1:
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"error: {msg}\n(run with --verbosity=1 for the traceback)", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped
