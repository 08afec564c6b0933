"""Exact k-nearest-neighbour search over PatchCore's memory bank, behind one interface:

    index = build_index(bank, kind)            # "grouped" (default), "brute" or "faiss"
    dist, idx = index.search(queries, k)       # [n, k] Euclidean distances ascending, bank rows
    index.distance_share()                     # share of query x bank distances computed so far

* BruteForceIndex: every distance, as blocked matrix products.
* FaissIndex: faiss IndexFlatL2 (also every distance).
* GroupedIndex: the bank grouped around its first rows. PatchCore stores the bank in greedy
  k-center selection order, so the first rows are well-spread centres. Each bank row belongs
  to its nearest centre, and the triangle inequality bounds every row of a group from below:
  |q - p| >= |q - c| - radius and |q - p| >= | |q - c| - |p - c| |. A query first searches its
  nearest centre's group exactly, which leaves a k-th best distance close to the final one;
  then every group whose first bound does not exceed it. There, each row within the annulus
  the second bound allows must also pass |q - p|^2 >= |Pq - Pp|^2 + (|r_q| - |r_p|)^2 (P: the
  bank's top LOW_DIM principal axes, r: the residuals), then the same bound over MID_DIM axes,
  before its full distance is computed. The work is in matrix products: the queries of a
  batch are sorted by nearest centre, so each group meets all the queries that need it at
  once (one product with its rows' principal coordinates). Exact: a skipped row cannot be
  closer (every bound carries a margin for float32 rounding); equal distances rank by bank
  row, so an answer does not depend on the batch or the thread count. The grouping is rebuilt
  at load (0.5-0.8 s for the 10% bottle bank on the loaded 2-core machine; deterministic).
"""

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from models.parallel import cpu_threads, over_positions
from utils import UserError

INDEX_KINDS = ("grouped", "brute", "faiss")
QUERY_BLOCK = 1 << 22   # query x bank distances per matmul block (16 MB of float32)
GROUP_SIZE = 64         # bank rows per group on average (n_groups = M / GROUP_SIZE)
LOW_DIM = 32            # principal components of the cheap per-row bound (bottle 10%: 90% of the variance)
MID_DIM = 128           # principal components of the second bound, for rows that pass the first (98%)
MIN_BLOCK = 384         # queries per parallel block at least (a block visits every group): 784 -> 2 blocks
BOUND_SLACK = 1e-4      # relative margin on every triangle bound: float32 distances err ~1e-6


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("--faiss needs the faiss package: pip install faiss-cpu (or drop --faiss)") from None
    return faiss


def build_index(bank, kind="grouped"):
    if kind not in INDEX_KINDS:
        raise UserError(f"unknown nearest-neighbour search {kind}; choose one of {', '.join(INDEX_KINDS)}")
    return {"grouped": GroupedIndex, "brute": BruteForceIndex, "faiss": FaissIndex}[kind](bank)


class _Counted:
    """Distances computed / distances a brute-force search would compute, over all searches."""
    computed = possible = 0

    def count(self, computed, n_queries):
        self.computed += int(computed)
        self.possible += int(n_queries) * len(self.bank)

    def distance_share(self):
        return self.computed / self.possible if self.possible else 0.0


def sorted_top_k(d2, k):
    """Row-wise k smallest of a [n, M] matrix -> (values, columns), ascending."""
    near = d2.argmin(axis=1)[:, None] if k == 1 else np.argpartition(d2, k - 1, axis=1)[:, :k]
    near_d = np.take_along_axis(d2, near, axis=1)
    ranked = np.argsort(near_d, axis=1, kind="stable")
    return np.take_along_axis(near_d, ranked, axis=1), np.take_along_axis(near, ranked, axis=1)


def squared_distances(q, q_sq, points, points_sq):
    """[n, m] float32 |q - p|^2 = |q|^2 - 2 q.p + |p|^2 (one matrix product)."""
    d = q @ points.T
    d *= -2
    d += points_sq
    d += q_sq[:, None]
    return d


class BruteForceIndex(_Counted):
    """Every query x bank distance, in blocks bounded in memory."""

    def __init__(self, bank):
        self.bank = np.ascontiguousarray(bank, np.float32)
        self.bank_sq = np.einsum("ij,ij->i", self.bank, self.bank)

    def search(self, queries, k=1):
        q = np.ascontiguousarray(queries, np.float32)
        k = min(k, len(self.bank))
        d2 = np.empty((len(q), k), np.float32)
        idx = np.empty((len(q), k), np.int64)
        # At least one block per core (one image's 784 queries against a 1% bank would otherwise
        # be a single block on a single thread).
        rows = max(1, min(QUERY_BLOCK // len(self.bank), -(-len(q) // cpu_threads())))

        def block(lo):
            s = slice(lo, lo + rows)
            d2[s], idx[s] = sorted_top_k(squared_distances(q[s], np.einsum("ij,ij->i", q[s], q[s]), self.bank,
                                                           self.bank_sq), k)
        over_positions(block, len(q), rows)
        self.count(len(q) * len(self.bank), len(q))
        return np.sqrt(np.maximum(d2, 0)), idx


class FaissIndex(_Counted):
    def __init__(self, bank):
        self.bank = np.ascontiguousarray(bank, np.float32)
        self.index = import_faiss().IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank)

    def search(self, queries, k=1):
        q = np.ascontiguousarray(queries, np.float32)
        d2, idx = self.index.search(q, min(k, len(self.bank)))
        self.count(len(q) * len(self.bank), len(q))
        return np.sqrt(np.maximum(d2, 0)), idx.astype(np.int64)


class GroupedIndex(_Counted):
    """Exact search that skips groups, and rows within a group, by lower bounds (module docstring)."""

    def __init__(self, bank, n_groups=None):
        self.bank = np.ascontiguousarray(bank, np.float32)
        m = len(self.bank)
        n_groups = int(n_groups or max(1, round(m / GROUP_SIZE)))
        n_groups = min(n_groups, m)
        # Centred coordinates: smaller norms, so less cancellation in |q|^2 - 2 q.c + |c|^2.
        self.origin = self.bank.mean(axis=0, dtype=np.float64).astype(np.float32)
        z = self.bank - self.origin
        self.centres = np.ascontiguousarray(z[:n_groups])
        self.centres_sq = np.einsum("ij,ij->i", self.centres, self.centres)
        owner = np.empty(m, np.int64)
        rows = max(1, QUERY_BLOCK // n_groups)

        def assign(lo):
            s = slice(lo, lo + rows)
            owner[s] = squared_distances(z[s], np.einsum("ij,ij->i", z[s], z[s]), self.centres,
                                         self.centres_sq).argmin(axis=1)
        over_positions(assign, m, rows)
        owner[:n_groups] = np.arange(n_groups)  # a centre is its own group's (rounding aside)
        # Exact distance of each row to its centre (float64): the bounds must not err.
        to_centre = np.sqrt(((z - self.centres[owner]).astype(np.float64) ** 2).sum(axis=1))
        order = np.lexsort((to_centre, owner))   # by group, then by distance to the centre
        self.order = order                      # grouped position -> bank row
        self.points = np.ascontiguousarray(z[order])
        # float32 for the annulus test: its rounding (~1e-7 relative) is far inside the margins.
        self.to_centre = to_centre[order].astype(np.float32)
        self.bounds = np.searchsorted(owner[order], np.arange(n_groups + 1))
        self.radius = np.zeros(n_groups)
        np.maximum.at(self.radius, owner, to_centre)
        # Per-row bounds before a full distance: with P the projection on the bank's top
        # principal axes, |q - p|^2 = |Pq - Pp|^2 + |r_q - r_p|^2 >= |Pq - Pp|^2 +
        # (|r_q| - |r_p|)^2 (r: the residuals), LOW_DIM and then MID_DIM products instead of D.
        # The basis only has to be a good one (the bounds hold for any orthonormal P), so float32.
        gram = (self.points.T @ self.points).astype(np.float64)
        with threadpool_limits(limits=1):  # threaded LAPACK took 3.4 s instead of 0.05 s for D=384
            _, vectors = np.linalg.eigh(gram)
        dim = self.points.shape[1]
        self.principal = np.ascontiguousarray(vectors[:, ::-1][:, :min(MID_DIM, dim)], np.float32)
        self.low = min(LOW_DIM, self.principal.shape[1])
        coords, self.residual_low, self.residual = self.project(self.points)
        self.points_low = np.ascontiguousarray(coords[:, :self.low])
        self.points_mid = np.ascontiguousarray(coords[:, self.low:])
        self.points_sq = np.einsum("ij,ij->i", self.points, self.points, dtype=np.float64).astype(np.float32)
        self.points_low_sq = np.einsum("ij,ij->i", self.points_low, self.points_low)
        self.group_sq = np.maximum.reduceat(self.points_sq, self.bounds[:-1])  # largest |p|^2 of each group

    def project(self, rows):
        """-> (principal coordinates [n, MID_DIM], residual norms after the first LOW_DIM and
        after all MID_DIM of them). The last residual is formed explicitly, as sqrt(|x|^2 -
        |Px|^2) would cancel for rows close to the principal subspace; the first adds the
        coordinates in between to it (a sum of squares: nothing cancels)."""
        coords = rows @ self.principal
        residual = np.linalg.norm(rows - coords @ self.principal.T, axis=1)
        between = coords[:, self.low:]
        return coords, np.sqrt(residual ** 2 + np.einsum("ij,ij->i", between, between)), residual

    def centre_distances(self, queries):
        """-> (centred queries, |q|^2, distances to the centres, nearest centre), in parallel
        blocks: one matrix product, then one pass for the square roots and the nearest."""
        n = len(queries)
        q = np.empty(queries.shape, np.float32)
        q_sq = np.empty(n, np.float32)
        dc = np.empty((n, len(self.centres)), np.float32)
        own = np.empty(n, np.int64)
        rows = max(1, min(1024, -(-n // cpu_threads())))

        def block(lo):
            s = slice(lo, lo + rows)
            x = q[s] = queries[s] - self.origin
            q_sq[s] = np.einsum("ij,ij->i", x, x)
            _distances_to_centres(x @ self.centres.T, q_sq[s], self.centres_sq, dc[s], own[s])
        over_positions(block, n, rows)
        return q, q_sq, dc, own

    def search(self, queries, k=1):
        k = min(k, len(self.bank))
        q, q_sq, dc, own = self.centre_distances(np.ascontiguousarray(queries, np.float32))
        n, n_low = len(q), self.low
        # Queries sorted by their nearest centre, in a few blocks per thread that run in
        # parallel; a block's queries of one group are searched together (one matrix product).
        order = np.argsort(own, kind="stable")
        d2 = np.empty((n, k), np.float32)
        idx = np.empty((n, k), np.int64)
        computed = np.zeros(n, np.int64)  # full distances per query
        blocks = max(1, min(2 * cpu_threads(), n // MIN_BLOCK))
        step = -(-n // blocks) if n else 1
        largest_centre = float(self.centres_sq.max())

        def run(lo):
            mine = order[lo:lo + step]
            x, x_sq, x_own, x_dc = q[mine], q_sq[mine], own[mine], dc[mine]
            coords, residual_low, residual = self.project(x)
            x_low, x_mid = np.ascontiguousarray(coords[:, :n_low]), np.ascontiguousarray(coords[:, n_low:])
            # float32 product error on |q - c|: at most sqrt of the error on its square (~D ulps
            # of the norms, at the largest centre); it also covers the rows' float32 distances.
            slack = np.sqrt(1e-5 * (x_sq + largest_centre))
            best_d2 = np.full((len(x), k), np.inf, np.float32)
            best_i = np.full((len(x), k), -1, np.int64)
            count = np.zeros(len(x), np.int64)
            _own_groups(x_own, x, x_sq, self.bounds, self.group_sq, self.points, self.points_sq, self.order,
                        best_d2, best_i, count)
            _other_groups(x_own, x, x_sq, x_low, np.einsum("ij,ij->i", x_low, x_low), x_mid, residual_low,
                          residual, x_dc, slack, self.radius, self.bounds, self.points, self.points_sq,
                          self.points_low, self.points_low_sq, self.points_mid, self.residual_low, self.residual,
                          self.to_centre, self.order, BOUND_SLACK, best_d2, best_i, count)
            d2[mine], idx[mine], computed[mine] = best_d2, best_i, count
        over_positions(run, n, step)
        self.count(computed.sum() + n * len(self.centres), n)
        return np.sqrt(np.maximum(d2, 0)), idx


# Reassociation lets the distance loops run in SIMD lanes; no 'ninf': the k best start at inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
ULP = 2.0 ** -24  # float32 unit roundoff


@numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
def _squared_distance(x, p):
    """|x - p|^2 in float32, the one formula every exact distance uses."""
    total = np.float32(0.0)
    for t in range(len(x)):
        diff = x[t] - p[t]
        total += diff * diff
    return total


@numba.njit(nogil=True, cache=True)
def _insert(best_d2, best_i, total, j):
    """Offer bank row j at squared distance `total` to the sorted k best. Equal distances rank
    by row (as brute force's stable sort does), so the result does not depend on the order
    rows are offered in (batch composition, blocks, threads)."""
    k = len(best_d2)
    if total > best_d2[k - 1] or (total == best_d2[k - 1] and j > best_i[k - 1] >= 0):
        return False
    at = k - 1
    while at > 0 and (best_d2[at - 1] > total or (best_d2[at - 1] == total and best_i[at - 1] > j)):
        best_d2[at] = best_d2[at - 1]
        best_i[at] = best_i[at - 1]
        at -= 1
    best_d2[at] = total
    best_i[at] = j
    return True


@numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
def _distances_to_centres(products, q_sq, centres_sq, out, nearest):
    """q.c products -> |q - c| = sqrt(|q|^2 - 2 q.c + |c|^2) (clipped at 0) and each query's
    nearest centre, in one pass."""
    for u in range(len(products)):
        best = 0
        for g in range(products.shape[1]):
            out[u, g] = np.sqrt(max(q_sq[u] + centres_sq[g] - np.float32(2.0) * products[u, g], np.float32(0.0)))
            if out[u, g] < out[u, best]:
                best = g
        nearest[u] = best


@numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
def _own_groups(own, q, q_sq, bounds, group_sq, points, points_sq, bank_row, best_d2, best_i, count):
    """1. Each query's own group (the nearest centre's), exactly: one matrix product per group
    gives every distance to within its rounding; the row it puts nearest is computed exactly
    first, then every row it does not put farther than the k-th best. This leaves a k-th best
    close to the final one."""
    n, k, dim = len(q), best_d2.shape[1], q.shape[1]
    # Rounding of |a|^2 + |b|^2 - 2 a.b in float32: within (2 dim + 8) ulps of |a|^2 + |b|^2.
    err = np.float32((2 * dim + 8) * ULP)
    two = np.float32(2.0)  # keeps the sums in float32 (an integer 2 would promote them to float64)
    i = 0
    while i < n:
        g = own[i]
        e = i + 1
        while e < n and own[e] == g:
            e += 1
        b0, b1 = bounds[g], bounds[g + 1]
        products = np.dot(q[i:e], points[b0:b1].T)
        for u in range(i, e):
            approx = q_sq[u] + points_sq[b0:b1] - two * products[u - i]
            margin = err * (q_sq[u] + group_sq[g])
            first = np.argmin(approx)  # the likely nearest first: the k-th best is then tight
            count[u] += 1
            _insert(best_d2[u], best_i[u], _squared_distance(q[u], points[b0 + first]), bank_row[b0 + first])
            for r in range(b1 - b0):
                if r != first and approx[r] - margin <= best_d2[u, k - 1]:
                    count[u] += 1
                    _insert(best_d2[u], best_i[u], _squared_distance(q[u], points[b0 + r]), bank_row[b0 + r])
        i = e


@numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
def _other_groups(own, q, q_sq, q_low, q_low_sq, q_mid, q_res_low, q_res, dc, slack_dc, radius, bounds, points,
                  points_sq, points_low, points_low_sq, points_mid, res_low, res, to_centre, bank_row, slack,
                  best_d2, best_i, count):
    """2. Every other group, for the queries its ball does not rule out: one product in the
    first principal coordinates gives their first bound to every row of the group; a row in
    the query's annulus whose bound passes gets the next coordinates' bound, then its exact
    distance. dc: [query, group] distances to the centres, each within slack_dc[query].
    The queries are a block of the batch sorted by their own group `own` (searched in 1.)."""
    n, k = len(q), best_d2.shape[1]
    dim_low, dim_mid = q_low.shape[1], q_mid.shape[1]
    grow, shrink = 1 + slack, np.float32(1 - 2 * slack)
    # The float32 rounding of |a|^2 + |b|^2 - 2 a.b over the first axes, on top of the
    # projections' own margin (1e-5 of the norms).
    err = np.float32(1e-5 + (2 * dim_low + 8) * ULP)
    two, infinity = np.float32(2.0), np.float32(np.inf)
    reach = np.empty(n)  # the k-th best distance, with margin
    for u in range(n):
        reach[u] = np.sqrt(best_d2[u, k - 1]) * grow
    chosen = np.empty(n, np.int64)
    low_bound = np.empty(np.max(bounds[1:] - bounds[:-1]), np.float32)
    for g in range(len(radius)):
        b0, b1 = bounds[g], bounds[g + 1]
        m = 0
        for u in range(n):
            chosen[m] = u
            # |q - p| >= |q - c| - radius for every row p of the group.
            m += (own[u] != g) & (dc[u, g] - slack_dc[u] - radius[g] <= reach[u])
        if m == 0:
            continue
        x = np.empty((m, dim_low), np.float32)
        for c in range(m):
            x[c] = q_low[chosen[c]]
        products = np.dot(x, points_low[b0:b1].T)
        group = to_centre[b0:b1]
        for c in range(m):
            u = chosen[c]
            # |q - p|^2 >= |Pq - Pp|^2 + (|r_q| - |r_p|)^2 (P: the first principal axes, r: the
            # residuals), with a margin for rounding relative to the norms; and only rows whose
            # distance to the centre lies within `reach` of |q - c| can be closer (triangle
            # inequality). For every row of the group at once (no branch: SIMD lanes), then
            # the rows that pass are taken one by one.
            ring_lo = np.float32(dc[u, g] - slack_dc[u] - reach[u])
            ring_hi = np.float32(dc[u, g] + slack_dc[u] + reach[u])
            x_sq, x_res, x_margin = q_low_sq[u], q_res_low[u], err * q_sq[u]
            lowest = infinity
            for r in range(b1 - b0):
                j = b0 + r
                gap = x_res - res_low[j]
                bound = ((x_sq + points_low_sq[j] - two * products[c, r] + gap * gap) * shrink
                         - x_margin - err * points_sq[j])
                inside = (group[r] >= ring_lo) & (group[r] <= ring_hi)
                low_bound[r] = bound if inside else infinity
                lowest = min(lowest, low_bound[r])
            limit = best_d2[u, k - 1]
            if lowest > limit:
                continue  # no row of the group passes (the usual case)
            for r in range(b1 - b0):
                if low_bound[r] > limit:
                    continue
                j = b0 + r
                margin = x_margin + err * points_sq[j]
                bound = x_sq + points_low_sq[j] - two * products[c, r]
                if dim_mid:  # the next principal axes: a tighter bound before the full row
                    x_mid, p_mid = q_mid[u], points_mid[j]
                    for t in range(dim_mid):
                        diff = x_mid[t] - p_mid[t]
                        bound += diff * diff
                    gap = q_res[u] - res[j]
                    if (bound + gap * gap) * shrink > limit + margin:
                        continue
                count[u] += 1
                if _insert(best_d2[u], best_i[u], _squared_distance(q[u], points[j]), bank_row[j]):
                    limit = best_d2[u, k - 1]
                    reach[u] = np.sqrt(limit) * grow
