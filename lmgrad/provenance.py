"""Provenance shared by every run: lmgrad version, git commit, host, time."""

from __future__ import annotations

import datetime
import functools
import pathlib
import platform
import subprocess
from typing import Any

import lmgrad


@functools.cache
def git_commit() -> str | None:
    """The commit of the lmgrad checkout (with `+dirty` if modified), or None outside git."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def run_info() -> dict[str, Any]:
    """Software and host facts for a manifest or summary."""
    import jax

    return {
        "lmgrad_version": lmgrad.__version__,
        "git_commit": git_commit(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "host": platform.node(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
