"""Limit BLAS threads for a block of code.

OpenBLAS's threaded LAPACK (Cholesky, eigh) thrashes on a busy machine: on 2 shared cores a
Cholesky of an 800 × 800 matrix took 0.5 s with the default threads and 8 ms with one, and the
task-space Gram pass as a whole went from minutes to seconds. The analysis is a long series of
such mid-sized factorisations and products, so it runs with one BLAS thread by default.
Uses threadpoolctl when installed, else the OpenBLAS libraries loaded in this process (found in
/proc/self/maps, as numpy and scipy wheels ship them); elsewhere it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator

# (setter, getter) symbol pairs of the OpenBLAS builds numpy and scipy wheels ship.
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


def _openblas() -> list[tuple[object, object]]:
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    out = []
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so[\w.\-]*)", maps))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in _SYMBOLS:
            if hasattr(lib, setter) and hasattr(lib, getter):
                out.append((getattr(lib, setter), getattr(lib, getter)))
                break
    return out


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with at most ``n`` BLAS threads (None: leave them alone)."""
    if n is None:
        yield
        return
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        with threadpoolctl.threadpool_limits(n, user_api="blas"):
            yield
        return
    libs = _openblas()
    before = [int(get()) for _, get in libs]
    for set_, _ in libs:
        set_(ctypes.c_int(n))
    try:
        yield
    finally:
        for (set_, _), old in zip(libs, before):
            set_(ctypes.c_int(old))
