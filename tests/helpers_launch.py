"""Run a launch/*.py program in-process: define its flags, parse argv, call its main, and remove the
flags again, so several launchers can be exercised in one test session without subprocesses."""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys
from typing import Any, Iterator

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def launcher(name: str, argv: list[str] | None = None) -> Iterator[Any]:
    """Yields the launcher module `launch/NAME.py` with `argv` parsed into absl's FLAGS."""
    fv = flags.FLAGS
    before = set(fv)
    full = [f"{name}.py", *(argv or [])]
    saved_argv = sys.argv
    # ml_collections' config flag finds its --config.X overrides in sys.argv, not in the parsed list.
    sys.argv = full
    try:
        spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fv(full)
        yield mod
    finally:
        sys.argv = saved_argv
        for flag_name in set(fv) - before:
            delattr(fv, flag_name)
        fv.unparse_flags()


def run_launcher(name: str, argv: list[str]) -> None:
    """Parses `argv` for launch/NAME.py and runs its main in this process."""
    with launcher(name, argv) as mod:
        mod.main([f"{name}.py"])
