"""Scale-out on paddle.distributed: the worker group, collectives with a timeout, and which
worker runs (and writes) what.

    python -m paddle.distributed.launch --nproc_per_node N train.py ...

A plain `python train.py` never imports paddle.distributed: `group()` is then a one-worker
group whose collectives return their input.

Waiting and small exchanges go through the launch's TCP store, polled against our own deadline
(`--dist_timeout`): gloo's collectives give up after 30 s, too short for a worker that waits
while another still fits a large category, and a peer that hangs must not hold the others
forever. The large float64 sums go through gloo's reduce (all_reduce), entered only once every
worker has arrived, so its 30 s bound only has to cover the transfer and the work the workers
then do in step.
"""
import base64
import contextlib
import os
import pickle
import signal
import sys
import time
import traceback

import numpy as np

from utils import UserError

DEFAULT_TIMEOUT_S = 1800.0
POLL_S = (0.0005, 0.02)  # first and longest pause between polls of the store
REDUCE_CHUNK = 4 << 20  # values per all_reduce call (32 MB of float64): bounds the tensor copies


def world():
    """(rank, size) as paddle.distributed.launch sets them; (0, 1) for a plain run."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


class WorkerFailed(SystemExit):
    """Ends this worker with one `error:` line (and exit 1), past the per-category error handling,
    so that the launch stops the others instead of leaving them to wait for this one."""

    def __init__(self, group, message):
        super().__init__(f"error: {group.who()}: {message}")


class Group:
    """The workers of one launch. A one-worker group (a plain run) does no communication."""

    def __init__(self, rank=0, size=1, timeout=DEFAULT_TIMEOUT_S):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.task = None   # what this worker is doing, for messages ("category bottle")
        self._store = None
        self._calls = 0

    def who(self):
        return f"worker {self.rank} of {self.size}" + (f", {self.task}" if self.task else "")

    def fail(self, message):
        raise WorkerFailed(self, message)

    def _start(self):
        import paddle.distributed as dist
        from paddle.base import core
        dist.init_parallel_env()
        self._store = core.create_or_get_global_tcp_store()
        # The launch stops the other workers with SIGTERM when one fails: end with a message,
        # through the `finally` blocks that remove half-written files.
        signal.signal(signal.SIGTERM, lambda *_: self.fail("stopped by the launch: another worker failed"))

    def _key(self, name):
        self._calls += 1  # every worker makes the same calls in the same order: same keys
        return f"ad/{self._calls}/{name}"

    def _wait_all(self, key, what):
        """Until every worker has set `key/<rank>`; the deadline names the missing workers."""
        self._store.add(f"{key}/{self.rank}", 1)
        deadline = time.monotonic() + self.timeout
        missing = list(range(self.size))
        pause = POLL_S[0]
        while True:
            missing = [r for r in missing if self._store.add(f"{key}/{r}", 0) == 0]
            if not missing:
                return
            if time.monotonic() > deadline:
                self.fail(f"no answer from worker {', '.join(map(str, missing))} within {self.timeout:g} s "
                          f"({what}); stopping (a dead or stuck worker; --dist_timeout sets the limit)")
            time.sleep(pause)
            pause = min(2 * pause, POLL_S[1])

    @contextlib.contextmanager
    def _gloo(self, what):
        """A gloo collective: a peer that closed its connection or timed out ends this worker in one line."""
        try:
            yield
        except RuntimeError as err:
            self.fail(f"{what} failed: a peer stopped answering ({str(err).splitlines()[0][:160]})")

    def gather(self, obj, what="gather"):
        """-> [obj of worker 0, ..., obj of worker N-1] on every worker (small objects)."""
        if self.size == 1:
            return [obj]
        key = self._key("gather")
        self._store.set(f"{key}/data/{self.rank}", base64.b64encode(pickle.dumps(obj, protocol=4)).decode())
        self._wait_all(key, what)
        return [pickle.loads(base64.b64decode(bytes(self._store.get(f"{key}/data/{r}")))) for r in range(self.size)]

    def barrier(self, what="barrier"):
        if self.size > 1:
            self._wait_all(self._key("barrier"), what)

    def all_reduce_sum(self, array, what="all_reduce", dtype=np.float64, wait=True, to=None):
        """Element-wise sum over the workers of an array (the same shape on each), in `dtype`.
        wait: first meet in the store (a worker may be minutes behind); False right after a
        call that met. to: only worker `to` gets the sum (gloo's reduce), the others None."""
        array = np.ascontiguousarray(array, dtype)
        if self.size == 1:
            return array
        import paddle
        import paddle.distributed as dist
        if wait:
            self.barrier(what)  # everyone is here: gloo's own 30 s timeout now only covers the transfer
        flat = array.reshape(-1)
        out = None if len(flat) <= REDUCE_CHUNK else np.empty(array.size, dtype)  # one call: its own array
        with self._gloo(what):
            for lo in range(0, len(flat), REDUCE_CHUNK):
                part = paddle.to_tensor(flat[lo:lo + REDUCE_CHUNK])
                if to is None:
                    dist.all_reduce(part)
                else:
                    dist.reduce(part, dst=to)
                if to not in (None, self.rank):
                    continue
                if out is None:
                    out = part.numpy()
                else:
                    out[lo:lo + REDUCE_CHUNK] = part.numpy()
        return None if out is None else out.reshape(array.shape)

    def gather_rows(self, arrays, counts, what="gather"):
        """Each worker's arrays (the same shapes but for the number of rows; worker r has counts[r]
        rows) concatenated in rank order, on every worker: one gloo all_gather of their bytes,
        padded to the longest share, with no store round trip (~40 ms each): for workers in step."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        if self.size == 1:
            return arrays
        import paddle
        import paddle.distributed as dist
        widths = [a.itemsize * int(np.prod(a.shape[1:])) for a in arrays]
        rows = np.zeros((max(counts), sum(widths)), np.uint8)
        rows[:counts[self.rank]] = np.concatenate([a.reshape(len(a), -1).view(np.uint8) for a in arrays], axis=1)
        parts = []
        with self._gloo(what):
            dist.all_gather(parts, paddle.to_tensor(rows))
        every = np.concatenate([p.numpy()[:c] for p, c in zip(parts, counts)])
        edges = np.cumsum([0] + widths)
        return [np.ascontiguousarray(every[:, lo:hi]).view(a.dtype).reshape((len(every),) + a.shape[1:])
                for a, lo, hi in zip(arrays, edges[:-1], edges[1:])]

    def average_tensor(self, tensor, what="average"):
        """Mean over the workers of a paddle tensor: gloo's all_reduce with no store barrier (a
        store round trip costs ~40 ms), for workers in step, which gloo's 30 s bound covers."""
        import paddle.distributed as dist
        with self._gloo(what):
            dist.all_reduce(tensor)
        return tensor / self.size

    def exchange(self, array, what="exchange"):
        """Every worker's float64 array (the same shape on each), stacked in rank order on every
        worker: gloo's all_gather with no store barrier, for the many exchanges of one
        computation that all workers run in step (gloo's 30 s timeout bounds each wait)."""
        array = np.ascontiguousarray(array, np.float64)
        if self.size == 1:
            return array
        import paddle
        import paddle.distributed as dist
        parts = []
        with self._gloo(what):
            dist.all_gather(parts, paddle.to_tensor(array))
        return np.concatenate([p.numpy() for p in parts])


_GROUP = None


def group(timeout=None):
    """This process's worker group (started on first use under a launch)."""
    global _GROUP
    if _GROUP is None:
        rank, size = world()
        _GROUP = Group(rank, size, timeout or DEFAULT_TIMEOUT_S)
        if size > 1:
            _GROUP._start()
    if timeout:
        _GROUP.timeout = timeout
    return _GROUP


def add_scaleout_args(parser):
    parser.add_argument("--split_category", action="store_true",
                        help="under paddle.distributed.launch: split each category's images over the workers "
                             "(the default when there are fewer categories than workers)")
    parser.add_argument("--dist_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="under paddle.distributed.launch: seconds a worker waits for the others")


# ---------------------------------------------------------------- who runs what
def balance(sizes, workers):
    """{category: size} -> one list of categories per worker: largest first, each to the least
    loaded worker (ties: the lower rank), so that the longest jobs do not all land on one."""
    load = [0] * workers
    share = [[] for _ in range(workers)]
    for name in sorted(sizes, key=lambda c: (-sizes[c], c)):
        w = min(range(workers), key=lambda i: (load[i], i))
        share[w].append(name)
        load[w] += sizes[name]
    return share


class Plan:
    """Which categories this worker runs and whether it owns their files.

    categories mode: each worker runs whole categories (its share) and writes their files.
    split mode: every worker runs every category on its share of the images; worker 0 writes.
    A one-worker plan runs everything and writes everything, as a plain run always did."""

    def __init__(self, group, categories, split):
        self.group, self.split = group, split
        self.categories = categories

    @property
    def alone(self):
        return self.group.size == 1

    @property
    def writes(self):
        """This worker writes the files of the categories it runs (models, metrics)."""
        return self.alone or not self.split or self.group.rank == 0

    def where(self, category):
        return category if self.alone else f"worker {self.group.rank} of {self.group.size}, category {category}"

    @contextlib.contextmanager
    def working_on(self, category):
        global _SPLIT
        self.group.task = f"category {category}"
        _SPLIT = self.group if self.split else None
        try:
            yield
        except UserError as err:
            if self.split:  # the others would wait for this worker's share: end all now
                self.group.fail(str(err))
            raise
        except Exception as err:  # a bug, out of memory: the trace, then the line naming this worker
            if self.alone:
                raise
            traceback.print_exc()
            self.group.fail(f"{type(err).__name__}: {err}")
        finally:
            _SPLIT, self.group.task = None, None

    def finish(self, results, failed, total, write_results):
        """After the categories: worker 0 writes every worker's rows with write_results(rows) and
        names every failed category. -> exit code (1 if a category failed on this worker, or,
        on worker 0, on any)."""
        every, every_failed = self.gather_results(results, failed)
        if every and not self.split:  # split: worker 0 had every row already
            write_results(every)
        if every_failed:
            print(f"error: {len(every_failed)} of {total} categories failed: {', '.join(every_failed)}",
                  file=sys.stderr)
        return 1 if failed or every_failed else 0

    def gather_results(self, results, failed):
        """-> (every worker's results, every worker's failures), in category order, on worker 0
        (others get empty lists). Arrays stay with the worker that made them."""
        mine = [{k: v for k, v in r.items() if k != "arrays"} for r in results] if self.writes else []
        parts = self.group.gather((mine, failed if self.writes else []), "collecting the results")
        if self.group.rank != 0:
            return [], []
        every = sorted((r for rs, _ in parts for r in rs), key=lambda r: r["category"])
        return every, sorted({c for _, fs in parts for c in fs})


def plan_categories(args, dataset, categories, title):
    """The Plan for this run: categories mode when there are at least as many categories as
    workers (balanced by image count), else (or with --split_category) split mode."""
    grp = group(getattr(args, "dist_timeout", None))
    if grp.size == 1:
        return Plan(grp, categories, split=False)
    if getattr(args, "report", False):
        raise UserError("--report is not supported under paddle.distributed.launch; build the report with "
                        "eval.py --report in one process")
    split = getattr(args, "split_category", False) or len(categories) < grp.size
    from models import METHODS
    updating = getattr(args, "update", False)  # reads only the new images: one worker per category
    if split and (title == "eval" or getattr(METHODS.get(args.method), "SPLITS_IMAGES", False) and not updating):
        return Plan(grp, categories, split=True)
    if split:  # nothing to share within a category: worker 0 runs them all
        print(f"[{title}] worker {grp.rank} of {grp.size}: {'all categories' if grp.rank == 0 else 'idle'} "
              f"(--update does not split a category's images)", flush=True)
        return Plan(grp, categories if grp.rank == 0 else [], split=False)
    count = dataset.train_samples if title == "train" else dataset.test_samples
    share = balance({c: len(count(c)) for c in categories}, grp.size)
    mine = [c for c in categories if c in share[grp.rank]]
    print(f"[{title}] worker {grp.rank} of {grp.size}: {', '.join(mine) or 'no category'}", flush=True)
    return Plan(grp, mine, split=False)


def share_of(items, grp):
    """This worker's contiguous share of a list (the shares, in rank order, are the list)."""
    if len(items) < grp.size:
        raise UserError(f"{len(items)} images cannot be split over {grp.size} workers")
    lo, hi = len(items) * grp.rank // grp.size, len(items) * (grp.rank + 1) // grp.size
    return items[lo:hi]


_SPLIT = None


def gather_arrays(grp, arrays, what):
    """Worker 0 gets each array (None stays None) concatenated over the workers in rank order;
    the others get None. The workers meet in the store (with its timeout) to learn each other's
    row counts; the arrays themselves (test maps: large) go through gloo, not the store, which
    would keep every value for the rest of the launch."""
    counts = [int(c) for c in grp.gather(len(arrays[0]), what)]
    gathered = iter(grp.gather_rows([a for a in arrays if a is not None], counts, what))
    if grp.rank != 0:
        return None
    return tuple(None if a is None else next(gathered) for a in arrays)


def split_group():
    """The group sharing the images of the category being worked on, or None (a plain run, or
    each worker on its own categories)."""
    return _SPLIT
