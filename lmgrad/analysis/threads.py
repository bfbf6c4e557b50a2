"""Limit BLAS threads for a block of code.

OpenBLAS's threaded LAPACK (Cholesky, eigh) thrashes on a busy machine: on 2 shared cores a
Cholesky of an 800 × 800 matrix took 0.5 s with the default threads and 8 ms with one, and the
task-space Gram pass as a whole went from minutes to seconds. The analysis is a long series of
such mid-sized factorisations and products, so it runs with one BLAS thread by default
(threadpoolctl, which finds the BLAS libraries numpy and scipy loaded).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import threadpoolctl


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with at most ``n`` BLAS threads (None: leave them alone)."""
    if n is None:
        yield
        return
    with threadpoolctl.threadpool_limits(n, user_api="blas"):
        yield
