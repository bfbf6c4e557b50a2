"""What every bench records beside its numbers, and where it appends them.

A bench run as ``python bench/bench_x.py`` has ``bench/`` first on ``sys.path``, so ``import _common``
finds this file; ``lmgrad`` itself comes from the editable install. The commit, versions and host
come from `lmgrad.provenance`, so a bench line and a run manifest describe a machine the same way.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable

import lmgrad
from lmgrad import provenance

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_path(bench: str) -> str:
    """``bench/results/<bench>.jsonl``."""
    return str(RESULTS_DIR / f"{bench}.jsonl")


def loadavg() -> float | None:
    """1-minute load average (None where the OS has none): benches share cores with other work."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command() -> str:
    """The command line that ran this bench, as one would retype it from the repository root
    (``python -m bench run ...`` when the entry point started it)."""
    if os.environ.get("LMGRAD_BENCH_COMMAND"):
        return os.environ["LMGRAD_BENCH_COMMAND"]
    return " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])


def run_meta(**extra: Any) -> dict[str, Any]:
    """Date, commit, command, host, versions, device and load for one bench run, plus ``extra``.

    Imports jax (for the backend and device): call it in the driver process, not before a
    worker has set XLA flags.
    """
    import jax

    info = provenance.run_info()
    dev = jax.devices()[0]
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": info["git_commit"], "command": command(), "host": info["host"],
            "lmgrad": lmgrad.__version__, "jax": info["jax_version"], "backend": info["backend"],
            "device": str(dev.device_kind), "n_devices": len(info["devices"]),
            "cpu": cpu_model(), "cores": usable_cores(), "loadavg": loadavg(),
            "suite": os.environ.get("LMGRAD_BENCH_SUITE"), **extra}


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Append one JSON line per row to ``path`` (directories created); returns the count.

    Appending, not an atomic rewrite: earlier lines are results of earlier runs and stay as they are.
    """
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows)
