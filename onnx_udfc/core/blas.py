"""BLAS threading for the many mid-sized products of udfc+."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def single_blas_thread() -> Iterator[None]:
    """Run BLAS on one thread (when ``threadpoolctl`` is installed; a no-op otherwise).

    udfc+ issues many mid-sized products (covariances of a few hundred channels). On a
    2-core machine that is busy with anything else, OpenBLAS's multi-threaded kernels stall
    on their spin-waits (measured: a 512x4608x512 product 4x slower, a matrix-vector product
    80x slower than on one thread); on an idle machine one thread costs little here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
