"""The Gaussian statistics of PaDiM / OrthoAD: per-position mean and precision from streamed
features, their packed storage and the distance kernel.

Fit streams: sums and outer products are accumulated batch by batch (shifted by the first
batch's mean so float32 accumulators stay accurate); no training feature is kept. The exact
float64 sums (`ExactSums`) serve the split fit over workers and `--update`.

Scoring reads one precision matrix per position for every image: at batch 1 that read, not
the arithmetic, is the cost. The precision is therefore stored as its upper triangle in
16-bit fixed point with a per-position scale (`pack_precision`), a quarter of the float32
matrices (R18 k=100: 31 MB instead of 125 MB, on disk too), and a compiled kernel
(`mahalanobis`) reads it once per image. On bottle (R18 k=100) the distance agrees with the
float64 formula to 1.2e-4 relative at worst, 6e-6 on average (float16 storage: 6e-4).
"""
import functools

import numba
import numpy as np

from models.parallel import cpu_threads, over_positions
from utils import UserError

EPSILON = 0.01        # covariance regulariser, as in PaDiM
POSITION_CHUNK = 256  # positions per vectorised step (at most; see position_chunk)
INVERT_BYTES = 4 << 20  # float64 matrices per inversion step (a few such temporaries per thread)
BLOCK_BYTES = 64 << 20  # outer-product blocks: above glibc's largest mmap threshold (32 MB)
TRIANGLE_POSITIONS, TRIANGLE_ROWS = 64, 16  # ExactSums' product blocks: positions x rows of the triangle
REDUCE_VALUES = 4 << 20  # float64 values of sums per reduce step (32 MB)


def position_chunk(k):
    """Positions per step so that a [chunk, k, k] float32 temporary stays near 16 MB."""
    return int(max(16, min(POSITION_CHUNK, (4 << 20) // (k * k))))


def invert_chunk(k):
    """Positions per inversion / packing step: 32 at k=100, 5 at k=300 (WRN50), where larger
    float64 temporaries on both threads would raise the fit's memory peak."""
    return int(max(1, min(32, INVERT_BYTES // (8 * k * k))))


# ---------------------------------------------------------------- statistics


class GaussianAccumulator:
    """Running per-position mean and covariance from [B, k, P] feature batches.

    The outer products live in blocks of positions of at least BLOCK_BYTES, so that finalize
    can hand each block back to the system (allocations that large are always their own
    mapping) as soon as it is inverted and packed: the peak stays at one float32 P*k*k array
    and the packed result grows into the memory given back (WRN50 k=300: 1.1 GB, not 1.4)."""

    def __init__(self):
        self.n = 0
        self.shift = self.total = self.outer = None

    def update(self, feats):
        b, k = feats.shape[:2]
        x = feats.reshape(b, k, -1).transpose(2, 0, 1)  # [P, B, k]
        step = position_chunk(k)
        if self.shift is None:
            self._allocate(x.shape[0], k, x.mean(axis=1).astype(np.float32))

        def accumulate(lo):
            xc = x[lo:lo + step] - self.shift[lo:lo + step, None, :]
            self.total[lo:lo + step] += xc.sum(axis=1)
            self._add_outer(lo, xc)

        over_positions(accumulate, x.shape[0], step)
        self.n += b

    def _allocate(self, positions, k, shift):
        step = position_chunk(k)
        self.block = step * max(1, -(-BLOCK_BYTES // (step * k * k * 4)))  # whole steps
        self.shift = shift
        self.total = np.zeros((positions, k), np.float64)
        self.outer = [np.zeros((min(self.block, positions - lo), k, k), np.float32)
                      for lo in range(0, positions, self.block)]

    def _add_outer(self, lo, xc):
        """Add the outer products of xc [positions from lo, B, k]."""
        at = lo % self.block
        self.outer[lo // self.block][at:at + len(xc)] += np.matmul(xc.transpose(0, 2, 1), xc)

    def finalize(self, epsilon=EPSILON):
        """-> mean [P, k], and the precision inv(cov + eps*I) packed by pack_precision
        (int16 [P, k(k+1)/2], scale float32 [P])."""
        n, m = _count_and_mean(self.n, self.total)
        k = m.shape[1]
        packed = np.empty((len(m), k * (k + 1) // 2), np.int16)
        scale = np.empty(len(m), np.float32)
        step = invert_chunk(k)

        def invert_block(index):
            outer, self.outer[index] = self.outer[index], None
            for at in range(0, len(outer), step):
                lo = index * self.block + at
                hi = lo + min(step, len(outer) - at)
                packed[lo:hi], scale[lo:hi] = _packed_precision(outer[at:at + step].astype(np.float64), m[lo:hi],
                                                                 n, epsilon)

        over_positions(invert_block, len(self.outer), chunk=1)
        self.outer = None
        return (self.shift + m).astype(np.float32), packed, scale


class ExactSums(GaussianAccumulator):
    """Float64 sums of x and of the upper triangle of x x^T per position, which add up across
    workers and over time (a plain accumulator's float32 sums over all images lose digits).
    Products are float64: float32 ones, 1.7x as fast, moved the precision by 3e-7 relative on
    bottle R18 k=100 (two workers vs one) and 6848 of the packed model's 15.8 M int16 entries by
    one step; with float64 the two models are identical. The products are of x minus a shift (the
    first batch's mean), so that a large mean costs no digits, added into float64 triangles (half
    the bytes of k x k sums); sums() re-centres them on zero."""

    def _allocate(self, positions, k, shift):
        self.shift = shift.astype(np.float64)  # x - shift is then float64 too
        self.total = np.zeros((positions, k), np.float64)
        self.outer = np.zeros((positions, k * (k + 1) // 2), np.float64)

    def _add_outer(self, lo, xc):
        # The triangle a few rows at a time, each block of rows its own small product: half the
        # flops of k x k products, and cache-resident (R18 k=100, 32 images: 0.145 s, not 0.24).
        k, rows = xc.shape[2], triangle_rows(xc.shape[2])
        for at in range(0, len(xc), TRIANGLE_POSITIONS):
            x = np.ascontiguousarray(xc[at:at + TRIANGLE_POSITIONS])  # xc follows the feature map's layout
            tri = self.outer[lo + at:lo + at + len(x)]
            for i0 in range(0, k, TRIANGLE_ROWS):
                part = np.matmul(x[:, :, i0:i0 + TRIANGLE_ROWS].transpose(0, 2, 1), x[:, :, i0:])
                for i in range(i0, min(i0 + TRIANGLE_ROWS, k)):
                    tri[:, rows[i]] += part[:, i - i0, i - i0:]

    def sums(self, lo=0, hi=None):
        """float64 count, sum of x [P, k] and the upper triangle of sum x x^T [P, k(k+1)/2] (the
        lower one is its mirror), of positions lo..hi."""
        shift, total = self.shift[lo:hi].astype(np.float64), self.total[lo:hi]
        # sum x x^T = sum (x-s)(x-s)^T + s t^T + t s^T + n s s^T, with t = sum (x-s)
        outer = _add_symmetric(self.outer[lo:hi].copy(), shift, total + self.n / 2 * shift)
        return {"count": self.n, "sum": total + self.n * shift, "outer": outer}

    def add_sums(self, sums):
        """Add sums() of other images (another worker's, or earlier ones) to these."""
        count, total = int(sums["count"]), sums["sum"]
        if self.shift is None:
            self._allocate(*total.shape, (total / max(count, 1)).astype(np.float32))
        shift = self.shift.astype(np.float64)
        # about the shift: sum (x-s)(x-s)^T = sum x x^T - s T^T - T s^T + n s s^T, with T = sum x
        self.outer += _add_symmetric(sums["outer"].copy(), -shift, total - count / 2 * shift)
        self.n += count
        self.total += total - count * shift

    def finalize(self, epsilon=EPSILON):
        sums, self.outer = {"count": self.n, "sum": self.total, "outer": self.outer}, None
        return finalize_sums(sums, epsilon, origin=self.shift)


def _add_symmetric(tri, a, b):
    """tri (upper triangles [P, k(k+1)/2]) += those of a b^T + b a^T, row by row (a, b [P, k])."""
    for i, row in triangle_rows(a.shape[1]).items():
        tri[:, row] += a[:, i, None] * b[:, i:] + b[:, i, None] * a[:, i:]
    return tri


def finalize_over(acc, group, keep_sums=False):
    """finalize() for the images of every worker of `group`, each with its own images' exact
    accumulator `acc`: each worker receives the summed sums of its own share of the positions
    (gloo's reduce to that share's owner, step by step: no worker copies or sends a whole
    all_reduce), inverts and packs only those, and the packed shares are gathered.
    -> ((mean, packed, scale), every worker's summed sums if keep_sums else None)."""
    count = int(group.all_reduce_sum([acc.n], "summing the image counts")[0])  # meets every worker
    positions, k = acc.total.shape
    bounds = [positions * r // group.size for r in range(group.size + 1)]
    counts = np.diff(bounds).tolist()
    step = max(1, REDUCE_VALUES // (k * (k + 1) // 2))
    total, outer = None, []
    for owner in range(group.size):
        lo, hi = bounds[owner], bounds[owner + 1]
        raw_sum = acc.total[lo:hi] + acc.n * acc.shift[lo:hi].astype(np.float64)
        got = group.all_reduce_sum(raw_sum, "summing the statistics", wait=False, to=owner)
        total = total if got is None else got
        for at in range(lo, hi, step):
            part = group.all_reduce_sum(acc.sums(at, min(at + step, hi))["outer"], "summing the statistics",
                                        wait=False, to=owner)
            outer += [] if part is None else [part]
    acc.outer = None  # the float64 triangles of every position
    share = {"count": count, "sum": total, "outer": np.concatenate(outer)}
    model = tuple(group.gather_rows(finalize_sums(share), counts, "gathering the model"))
    if not keep_sums:
        return model, None
    total, outer = group.gather_rows((share["sum"], share["outer"]), counts, "gathering the sums")
    return model, {"count": count, "sum": total, "outer": outer}


def finalize_sums(sums, epsilon=EPSILON, origin=0):
    """GaussianAccumulator.finalize() from float64 sums (ExactSums.sums(), of a worker's share of
    the positions, or about `origin`), unpacking a few triangles at a time."""
    n, m = _count_and_mean(int(sums["count"]), sums["sum"])
    k = m.shape[1]
    rows, cols = np.triu_indices(k)
    packed = np.empty((len(m), len(rows)), np.int16)
    scale = np.empty(len(m), np.float32)
    step = invert_chunk(k)

    def invert(lo):
        tri = sums["outer"][lo:lo + step]
        outer = np.empty((len(tri), k, k))
        outer[:, rows, cols] = tri
        outer[:, cols, rows] = tri
        packed[lo:lo + step], scale[lo:lo + step] = _packed_precision(outer, m[lo:lo + step], n, epsilon)

    over_positions(invert, len(m), step)
    return (origin + m).astype(np.float32), packed, scale


def _count_and_mean(n, total):
    if n < 2:
        raise UserError("at least 2 training images are needed to fit a covariance")
    return n, total / n


def _packed_precision(outer, mean, n, epsilon):
    """float64 sums of x x^T [c, k, k] (overwritten) and the mean, both about the same origin ->
    pack_precision(inv(cov + epsilon * I))."""
    cov = outer
    cov -= n * mean[:, :, None] * mean[:, None, :]
    cov /= n - 1
    cov += np.eye(cov.shape[1]) * epsilon
    return pack_precision(np.linalg.inv(cov))


@functools.lru_cache(maxsize=4)
def triangle_rows(k):
    """{row i: its slice of a packed upper triangle (the entries i, i..k-1)}: row slices copy
    several times faster than fancy indexing with np.triu_indices."""
    starts = np.concatenate([[0], np.cumsum(np.arange(k, 0, -1))])
    return {i: slice(int(starts[i]), int(starts[i + 1])) for i in range(k)}


def unpack_precision(packed, scale):
    """Inverse of pack_precision (to the 16-bit grid): [P, k, k] float64, for tests and inspection."""
    t = packed.shape[1]
    k = int(round((np.sqrt(8 * t + 1) - 1) / 2))
    rows, cols = np.triu_indices(k)
    full = np.zeros((len(packed), k, k))
    full[:, rows, cols] = packed * scale[:, None].astype(np.float64) / np.where(rows == cols, 1.0, 2.0)
    return full + np.triu(full, 1).transpose(0, 2, 1)


PACK_LEVELS = 32767  # int16 fixed point: the largest entry of each position maps to +-32767


def pack_precision(precision):
    """[P, k, k] symmetric -> (int16 [P, k(k+1)/2], float32 [P]): each row's upper triangle
    (off-diagonal entries doubled, so the quadratic form needs only that half) in fixed point,
    value = int16 * scale. Fixed point keeps the absolute error of the large entries, which
    dominate the distance, 16x below float16's (bottle: 5x smaller distance error)."""
    p, k = precision.shape[:2]
    rows, cols = np.triu_indices(k)
    weight = np.where(rows == cols, 1.0, 2.0)
    packed = np.empty((p, len(rows)), np.int16)
    scale = np.empty(p, np.float32)
    step = invert_chunk(k)
    for lo in range(0, p, step):
        tri = precision[lo:lo + step][:, rows, cols].astype(np.float64) * weight
        peak = np.maximum(np.abs(tri).max(axis=1), 1e-30)
        packed[lo:lo + step] = np.rint(tri * (PACK_LEVELS / peak[:, None]))
        scale[lo:lo + step] = peak / PACK_LEVELS
    return packed, scale


@numba.njit(nogil=True, fastmath=True, cache=True)
def _packed_quadratic_forms(x, mean, packed, scale, out, lo, hi):
    """out[n, p] = d^T P d with d = x[n, :, p] - mean[p], for positions lo..hi, P packed by
    pack_precision. One pass over each position's triangle serves every image of the batch."""
    b, k, _ = x.shape
    d = np.empty(k, np.float32)
    for p in range(lo, hi):
        row = packed[p]
        for n in range(b):
            for i in range(k):
                d[i] = x[n, i, p] - mean[p, i]
            total = np.float32(0.0)
            start = 0
            for i in range(k):
                width = k - i
                tri = row[start:start + width]
                tail = d[i:]
                partial = np.float32(0.0)
                for j in range(width):
                    partial += np.float32(tri[j]) * tail[j]
                total += d[i] * partial
                start += width
            out[n, p] = total * scale[p]


def mahalanobis(feats, mean, packed, scale):
    """feats [B, k, H, W], mean [P, k], (packed, scale) from pack_precision -> distances [B, H, W]."""
    b, k, h, w = feats.shape
    # The kernel does not bound-check: statistics of another model would be read past their end.
    if mean.shape != (h * w, k) or packed.shape != (h * w, k * (k + 1) // 2) or scale.shape != (h * w,):
        raise ValueError(f"features [{k} channels, {h}x{w}] do not match statistics with mean {list(mean.shape)} "
                         f"and packed precision {list(packed.shape)}")
    x = np.ascontiguousarray(feats, np.float32).reshape(b, k, h * w)
    out = np.empty((b, h * w), np.float32)
    step = -(-h * w // (4 * cpu_threads()))  # a few chunks per core balance the threads

    def distance(lo):
        _packed_quadratic_forms(x, mean, packed, scale, out, lo, min(lo + step, h * w))

    over_positions(distance, h * w, step)
    return np.sqrt(np.maximum(out, 0)).reshape(b, h, w)
