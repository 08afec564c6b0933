"""Exact k-nearest-neighbour search over PatchCore's memory bank, behind one interface:

    index = build_index(bank, kind)            # "grouped" (default), "brute" or "faiss"
    dist, idx = index.search(queries, k)       # [n, k] Euclidean distances ascending, bank rows
    index.distance_share()                     # share of query x bank distances computed so far

* BruteForceIndex: every distance, as blocked matrix products.
* FaissIndex: faiss IndexFlatL2 (also every distance).
* GroupedIndex: the bank grouped around its first rows. PatchCore stores the bank in greedy
  k-center selection order, so the first rows are well-spread centres. Each bank row belongs
  to its nearest centre, and the triangle inequality bounds every row of a group from below:
  |q - p| >= |q - c| - radius and |q - p| >= | |q - c| - |p - c| |. A query first searches
  its nearest centre's group, then every group whose first bound does not exceed its k-th best
  distance so far, and within a group only the rows in the annulus the second bound allows;
  each such row must also pass |q - p|^2 >= |Pq - Pp|^2 + (|r_q| - |r_p|)^2 (P: the bank's top
  LOW_DIM principal components, r: the residuals) before its full distance is computed. Exact:
  a skipped row cannot be closer (every bound carries a margin for float32 rounding). The
  grouping is rebuilt at load (one product of the bank with the centres and a principal-
  component basis: 0.5-0.8 s for the 10% bottle bank on the loaded 2-core machine; deterministic).
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
TILE = 8                # queries searched together (a bank row read once serves them all)
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
    computed = possible = bounds_computed = 0

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
    """Exact search that skips groups (and rows within a group) by the triangle inequality."""

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
        self.to_centre = to_centre[order]
        self.bounds = np.searchsorted(owner[order], np.arange(n_groups + 1))
        self.radius = np.zeros(n_groups)
        np.maximum.at(self.radius, owner, to_centre)
        # Per-row bound before a full distance: with P the projection on the bank's top
        # principal components, |q - p|^2 = |Pq - Pp|^2 + |r_q - r_p|^2 >= |Pq - Pp|^2 +
        # (|r_q| - |r_p|)^2 (r: the residuals), LOW_DIM products instead of D.
        # The basis only has to be a good one (the bounds hold for any orthonormal P), so float32.
        gram = (self.points.T @ self.points).astype(np.float64)
        with threadpool_limits(limits=1):  # threaded LAPACK took 3.4 s instead of 0.05 s for D=384
            _, vectors = np.linalg.eigh(gram)
        self.principal = np.ascontiguousarray(vectors[:, ::-1][:, :min(LOW_DIM, self.points.shape[1])], np.float32)
        self.points_low, self.residual = self.project(self.points)
        self.points_sq = np.einsum("ij,ij->i", self.points, self.points, dtype=np.float64)

    def project(self, rows):
        """-> (P rows [n, LOW_DIM], |rows - P rows| [n]); the residual is formed explicitly, as
        sqrt(|x|^2 - |Px|^2) would cancel for rows close to the principal subspace."""
        low = rows @ self.principal
        return low, np.linalg.norm(rows - low @ self.principal.T, axis=1)

    def search(self, queries, k=1):
        q = np.ascontiguousarray(queries, np.float32) - self.origin
        k = min(k, len(self.bank))
        q_sq = np.einsum("ij,ij->i", q, q)
        q_low, q_residual = self.project(q)
        to_centres = np.sqrt(np.maximum(squared_distances(q, q_sq, self.centres, self.centres_sq), 0))
        # float32 product error on |q - c|: at most sqrt of the error on its square (~D ulps of
        # the norms); the margin also covers the rows' float32 distances.
        slack = np.sqrt(1e-5 * (q_sq[:, None] + self.centres_sq)).astype(np.float32)
        to_centres_low = np.maximum(to_centres - slack, 0)
        # Queries sorted by their nearest centre: consecutive queries visit the same groups,
        # whose rows then stay in cache.
        by_group = np.argsort(to_centres.argmin(axis=1), kind="stable")
        d2 = np.empty((len(q), k), np.float32)
        idx = np.empty((len(q), k), np.int64)
        computed = np.zeros((len(q), 2), np.int64)  # full distances, row bounds
        step = -(-len(q) // (4 * cpu_threads()))

        def run(lo):
            _grouped_knn(q, q_sq, q_low, q_residual, by_group[lo:lo + step], to_centres_low, to_centres + slack,
                         self.radius, self.points, self.points_sq, self.points_low, self.residual, self.to_centre,
                         self.bounds, BOUND_SLACK, TILE, d2, idx, computed)
        over_positions(run, len(q), max(step, 1))
        self.count(computed[:, 0].sum() + len(q) * len(self.centres), len(q))
        self.bounds_computed += int(computed[:, 1].sum())
        return np.sqrt(np.maximum(d2, 0)), self.order[idx]


# Reassociation lets the distance loop run in SIMD lanes; no 'ninf': the k best start at inf.
@numba.njit(nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, cache=True)
def _grouped_knn(q, q_sq, q_low, q_residual, queries, dc_low, dc_high, radius, points, points_sq, points_low,
                 residual, to_centre, bounds, slack, tile, out_d2, out_idx, computed):
    """k nearest grouped rows of each query in `queries` (squared distances ascending, grouped
    positions); dc_low/dc_high bound each query's distance to each centre. Queries go in tiles
    of `tile` (neighbours in `queries` share groups): a bank row is read once for the tile's
    queries that need it, which then find it in L1 (row by row per query ran memory-bound)."""
    n_groups = len(radius)
    dim, dim_low = q.shape[1], q_low.shape[1]
    k = out_d2.shape[1]
    best_d2 = np.empty((tile, k), np.float32)
    best_i = np.empty((tile, k), np.int64)
    count = np.empty((tile, 2), np.int64)
    ring_lo = np.empty(tile)
    ring_hi = np.empty(tile)
    active = np.empty(tile, np.int64)
    seen = np.zeros(n_groups, np.bool_)
    order = np.empty(n_groups, np.int64)
    for t0 in range(0, len(queries), tile):
        members = queries[t0:t0 + tile]
        n_members = len(members)
        best_d2[:] = np.inf
        best_i[:] = -1
        count[:] = 0
        # The groups of the members' nearest centres first (they give close rows, so tight
        # bounds), then every other group that the bounds do not rule out.
        n_first = 0
        for a in range(n_members):
            g = np.argmin(dc_low[members[a]])
            if not seen[g]:
                seen[g] = True
                order[n_first] = g
                n_first += 1
        n_order = n_first
        for g in range(n_groups):
            if not seen[g]:
                order[n_order] = g
                n_order += 1
        for i in range(n_first):
            seen[order[i]] = False
        for i in range(n_order):
            g = order[i]
            n_active = 0
            low_all, high_all = np.inf, -np.inf
            for a in range(n_members):
                qi = members[a]
                worst = np.sqrt(best_d2[a, k - 1]) * (1 + slack)  # the k-th best distance, with margin
                if dc_low[qi, g] - radius[g] > worst:
                    continue  # |q - p| >= |q - c| - radius for every row p of the group
                # Only rows whose distance to the centre lies within `worst` of |q - c| can be
                # closer (triangle inequality); the group is sorted by that distance.
                ring_lo[a] = dc_low[qi, g] - worst
                ring_hi[a] = dc_high[qi, g] + worst
                low_all = min(low_all, ring_lo[a])
                high_all = max(high_all, ring_hi[a])
                active[n_active] = a
                n_active += 1
            if n_active == 0:
                continue
            group = to_centre[bounds[g]:bounds[g + 1]]
            start = bounds[g] + np.searchsorted(group, low_all)
            stop = bounds[g] + np.searchsorted(group, high_all, "right")
            for j in range(start, stop):
                for slot in range(n_active):
                    a = active[slot]
                    if to_centre[j] < ring_lo[a] or to_centre[j] > ring_hi[a]:
                        continue
                    qi = members[a]
                    count[a, 1] += 1
                    x_low, p_low = q_low[qi], points_low[j]  # row views: the loops vectorise
                    bound = np.float32(0.0)
                    for t in range(dim_low):
                        diff = x_low[t] - p_low[t]
                        bound += diff * diff
                    gap = q_residual[qi] - residual[j]
                    bound += gap * gap
                    # Margin: float32 rounding of the projections, relative to the norms involved.
                    if bound * (1 - 2 * slack) - 1e-5 * (q_sq[qi] + points_sq[j]) > best_d2[a, k - 1]:
                        continue
                    x, p = q[qi], points[j]
                    total = np.float32(0.0)
                    for t in range(dim):
                        diff = x[t] - p[t]
                        total += diff * diff
                    count[a, 0] += 1
                    if total < best_d2[a, k - 1]:
                        at = k - 1  # insertion into the sorted k best (ties keep the earlier row)
                        while at > 0 and best_d2[a, at - 1] > total:
                            best_d2[a, at] = best_d2[a, at - 1]
                            best_i[a, at] = best_i[a, at - 1]
                            at -= 1
                        best_d2[a, at] = total
                        best_i[a, at] = j
        for a in range(n_members):
            out_d2[members[a]] = best_d2[a]
            out_idx[members[a]] = best_i[a]
            computed[members[a]] = count[a]
