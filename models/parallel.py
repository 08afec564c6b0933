"""The CPU threads of this process's numeric work, set once from --cpu_threads.

Paddle Inference takes --cpu_threads for its own OpenMP pool; this module makes the rest follow
it: the pool that runs the statistics, scoring and search over chunks of positions, and BLAS.
Without it, two workers launched with --cpu_threads 1 on a 2-core machine each still ran their
statistics on both cores and slowed each other down.
"""
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController, threadpool_limits

# The controller holds every BLAS and OpenMP library loaded when it is made. numba's np.dot (the
# grouped nearest-neighbour search) calls scipy's BLAS, not numpy's: load it first.
importlib.import_module("scipy.linalg.cython_blas")
_BLAS = ThreadpoolController()
_threads = os.cpu_count() or 1
_pool = None
_pool_lock = threading.Lock()  # a service scores several models from their own threads


def set_cpu_threads(count):
    """Threads for over_positions and BLAS from now on (default: every core)."""
    global _threads, _pool
    count = max(1, int(count or os.cpu_count() or 1))
    with _pool_lock:
        if count != _threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _threads, _pool = count, None
    threadpool_limits(limits=count, user_api="blas")  # stays in force (no `with`); raising it back works too


def cpu_threads():
    return _threads


def over_positions(fn, n_positions, chunk):
    """Run fn(lo) for every chunk of positions (or rows), one thread per CPU thread. Each matrix
    is small, so BLAS's own threading only adds overhead: it is held at one thread while chunks
    run in parallel (numpy and LAPACK release the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads)
        pool = _pool
    with _BLAS.limit(limits=1):
        list(pool.map(fn, range(0, n_positions, chunk)))


def single_threaded_blas():
    """Context: every BLAS at one thread for the caller (the scorers parallelise over positions
    themselves; BLAS worker threads, which spin after each product, would take the cores)."""
    return _BLAS.limit(limits=1, user_api="blas")
