"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features,
nearest-neighbour patch scores and the paper's re-weighted image score (`--method coreset`).

Features (static graph, so deployment runs the same path): layer2 and layer3, each averaged
over 3x3 patch neighbourhoods, layer3 bilinearly upsampled to layer2's grid, concatenated and
average-pooled over channels to EMBED_DIM (adaptive pooling, written as a fixed 1x1 conv).

For resnet18 that pooling maps 384 channels to 1024: the features lie in a 384-dim subspace,
so the graph outputs their coordinates in an orthonormal basis of it (the basis is folded
into the pooling conv). Euclidean distances are unchanged; the conv, the outputs and the
nearest-neighbour search are 2.7x smaller.

Memory bank: exact greedy k-center coreset of all training patches (`greedy_k_center`), chosen
in a seeded 128-dim Gaussian random projection, `--coreset_ratio` of the patches.
"""

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from datasets.transforms import Preprocess
from models.backbone import ResNetFeatures, check_backbone_input, make_engine, run_in_chunks
from models.nn_index import build_index, import_faiss
from models.padim import make_projection
from models.parallel import over_positions
from utils import UserError

LAYERS = ("layer2", "layer3")
EMBED_DIM = 1024        # feature dimension after channel pooling (the reference's default)
PROJECT_DIM = 128       # random projection the coreset is selected in
ROW_CHUNK = 8192        # training patches per block in the dense k-center updates


# ---------------------------------------------------------------- features
def channel_pool_matrix(channels, dim):
    """[dim, channels] matrix equal to adaptive_avg_pool1d over channels: output i averages
    channels floor(i*C/dim) .. ceil((i+1)*C/dim) - 1."""
    pool = np.zeros((dim, channels), np.float32)
    for i in range(dim):
        lo, hi = i * channels // dim, -(-(i + 1) * channels // dim)
        pool[i, lo:hi] = 1.0 / (hi - lo)
    return pool


def feature_basis(pool):
    """Orthonormal basis [dim, rank] of the pooled features' subspace, or None when they span
    all `dim` dimensions (then the basis would only cost a matmul)."""
    u, s, _ = np.linalg.svd(pool.astype(np.float64), full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum())
    return None if rank == pool.shape[0] else u[:, :rank].astype(np.float32)


class PatchCoreFeatureNet(nn.Layer):
    """image -> locally aware patch features [B, D, H/8, W/8]: EMBED_DIM channel-pooled features,
    in an orthonormal basis of their subspace when they do not span all EMBED_DIM (D = rank)."""

    def __init__(self, arch, dim=EMBED_DIM):
        super().__init__()
        self.backbone = ResNetFeatures(arch, LAYERS)
        pool = channel_pool_matrix(sum(self.backbone.channels()), dim)
        basis = feature_basis(pool)
        weight = pool if basis is None else (basis.T.astype(np.float64) @ pool).astype(np.float32)
        self.register_buffer("channel_pool", paddle.to_tensor(weight[:, :, None, None]))

    def forward(self, x):
        # exclusive=False: border averages count the zero padding, as the reference's AvgPool2d.
        fine, coarse = [F.avg_pool2d(f, 3, stride=1, padding=1, exclusive=False) for f in self.backbone(x)]
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return F.conv2d(paddle.concat([fine, coarse], axis=1), self.channel_pool)


def patch_rows(features):
    """[B, D, h, w] -> [B*h*w, D], rows in (image, y, x) order."""
    return np.ascontiguousarray(features.transpose(0, 2, 3, 1).reshape(-1, features.shape[1]), np.float32)


# ---------------------------------------------------------------- coreset
def greedy_k_center(points, n_select, seed, per_update=256, n_candidates=4096, n_blocks=1024, progress=False,
                    group=None, overwrite=False):
    """Exact greedy k-center (Gonzalez): a seeded random first centre, then always the point
    farthest from the centres chosen so far (ties: the lowest index).

    -> (indices [n_select] in selection order, radii [n_select]); radii[t] is the distance of
    centre t to the earlier centres, i.e. the coverage radius of the first t (radii[0] = inf),
    so it never increases.

    With `group` (scaleout.Group) each worker passes its share of the points (the shares, in
    rank order, are the points) and gets the indices one process would choose from all of
    them. Distances are computed in float64 and compared rounded to float32, so that a distance
    is the same number whichever worker, block or matrix product computed it.

    Two exact accelerations (ties aside):
    * lazy updates: every point's squared distance to the chosen set (`nearest`) is updated by
      one matrix product per `per_update` new centres. In between, the next centre is the best
      of a pool of `n_candidates` points with the largest stale distances (each worker offers
      its share of the pool: one exchange per round), whose distances are kept current: stale
      distances only overestimate, so while that best beats the largest stale distance outside
      the pool it is the farthest point; otherwise the update runs early.
    * pruning: from the first `n_blocks` centres on, points are grouped (and stored contiguously)
      by their nearest centre, a ball of radius R_b around centre b. A new centre c can only
      bring a point of block b closer when |c - b| - R_b < the farthest point of b (triangle
      inequality); other blocks are skipped (~90% of the distances on bottle at 10%).

    overwrite: `points` (float64) may be used as the working copy, saving one copy's memory.
    """
    rank, workers = (0, 1) if group is None else (group.rank, group.size)
    z = np.asarray(points, np.float64) if overwrite else np.array(points, np.float64)  # centred in place
    n = len(z)
    counts = [n] if group is None else group.gather(n, "counting the patches")
    start, n_total = sum(counts[:rank]), sum(counts)
    if not 0 < n_select <= n_total:
        raise ValueError(f"cannot select {n_select} of {n_total} points")
    total = z.sum(axis=0)
    z -= (total if group is None else group.all_reduce_sum(total, "summing the patches")) / n_total
    sq = np.einsum("ij,ij->i", z, z)
    order = np.arange(start, start + n)  # working position -> global index (points get regrouped by block)
    pool_share = max(1, -(-n_candidates // workers))
    first = np.random.RandomState(seed).randint(n_total)
    row = z[first - start] if start <= first < start + n else np.zeros(z.shape[1])
    row = row if group is None else group.all_reduce_sum(row, "sending the first centre")  # zeros elsewhere
    chosen, radii, centres = [first], [np.inf], [row]
    nearest = as_distance(sq - 2 * (z @ row) + row @ row)
    if start <= first < start + n:
        nearest[first - start] = -np.inf  # chosen points are marked, so that rounding never brings one back
    owner = np.zeros(n, np.int64)  # position in `chosen` of each point's nearest centre
    blocks = None                  # (bounds, centres, their |c|^2, radius, farthest) once grouped

    def offer_pool():
        """-> every worker's candidates [m, 2 + D] (distance, global index, point), in index
        order, the largest stale distance outside them, and {global index: my position}."""
        top = min(n, pool_share)
        split = np.argpartition(nearest, n - top)
        cand = split[n - top:]
        stale = nearest[split[:n - top]].max() if top < n else -np.inf
        offer = np.full((pool_share, 3 + z.shape[1]), -np.inf)
        offer[:top, 0], offer[:top, 1], offer[:top, 3:] = nearest[cand], order[cand], z[cand]
        offer[:, 2] = stale
        pool = offer if group is None else group.exchange(offer, "choosing the farthest patch")
        pool = pool[pool[:, 1] >= 0]
        pool = pool[np.argsort(pool[:, 1], kind="stable")]  # argmax's first maximum: the lowest index
        return pool, pool[:, 2].max() if len(pool) else -np.inf, dict(zip(order[cand].tolist(), cand.tolist()))

    def pick(limit):
        pool, stale_max, mine = offer_pool()
        current, index, zc = pool[:, 0].astype(np.float32), pool[:, 1].astype(np.int64), pool[:, 3:]
        sqc = np.einsum("ij,ij->i", zc, zc)
        new = []
        while len(new) < limit:
            i = int(current.argmax())
            if current[i] < stale_max:
                break
            new.append(i)
            radii.append(float(np.sqrt(max(current[i], 0))))
            np.minimum(current, as_distance(sqc - 2 * (zc @ zc[i]) + sqc[i]), out=current)
            current[i] = -np.inf
        for i in new:
            if int(index[i]) in mine:
                nearest[mine[int(index[i])]] = -np.inf
        return index[new].tolist(), zc[new]

    def dense_update(new_rows):
        base, zt, sqn = len(chosen) - len(new_rows), -2 * new_rows.T, np.einsum("ij,ij->i", new_rows, new_rows)

        def rows(lo):
            s = slice(lo, lo + ROW_CHUNK)
            d = z[s] @ zt
            d += sqn
            arg = d.argmin(axis=1)
            dist = as_distance(d[np.arange(len(d)), arg] + sq[s])
            closer = dist < nearest[s]
            nearest[s] = np.where(closer, dist, nearest[s])
            owner[s] = np.where(closer, base + arg, owner[s])
        over_positions(rows, n, ROW_CHUNK)

    def group_by_owner():
        nonlocal z, sq, nearest, order
        perm = np.argsort(owner, kind="stable")
        z, sq, nearest, order = z[perm], sq[perm], nearest[perm], order[perm]
        bounds = np.searchsorted(owner[perm], np.arange(len(chosen) + 1))
        radius = np.full(len(chosen), -np.inf, np.float32)  # empty blocks are never reached
        full = np.flatnonzero(np.diff(bounds) > 0)
        radius[full] = np.sqrt(np.maximum(np.maximum.reduceat(nearest, bounds[full]), 0))
        block_centres = np.array(centres)
        return bounds, block_centres, np.einsum("ij,ij->i", block_centres, block_centres), radius, radius.copy()

    def blocked_update(new_rows):
        bounds, block_centres, centre_sq, radius, farthest = blocks
        zt, sqn = -2 * new_rows.T, np.einsum("ij,ij->i", new_rows, new_rows)
        centre_dist = np.sqrt(np.maximum(centre_sq[:, None] + block_centres @ zt + sqn, 0))
        # Small margin: the bound must not prune on rounding.
        reach = centre_dist < (radius + farthest)[:, None] * (1 + 1e-5) + 1e-6
        active = np.flatnonzero(reach.any(axis=1))
        step = -(-len(active) // 8)  # a few slices per thread: blocks differ in size and reach

        def update(lo):
            for b in active[lo:lo + step]:
                s, cols = slice(bounds[b], bounds[b + 1]), reach[b]
                d = z[s] @ zt[:, cols]
                d += sqn[cols]
                np.minimum(nearest[s], as_distance(d.min(axis=1) + sq[s]), out=nearest[s])
                farthest[b] = np.sqrt(max(nearest[s].max(), 0))
        over_positions(update, len(active), max(step, 1))

    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress, leave=False)
    bar.update(1)
    with threadpool_limits(limits=1):  # the per-centre matvecs are tiny: threads only contend
        while len(chosen) < n_select:
            limit = min(per_update, n_select - len(chosen))
            if blocks is None and len(chosen) < n_blocks:
                limit = min(limit, n_blocks - len(chosen))
            new, new_rows = pick(limit)
            chosen += new
            centres += list(new_rows)
            bar.update(len(new))
            if len(chosen) == n_select:
                break
            (dense_update if blocks is None else blocked_update)(new_rows)
            if blocks is None and len(chosen) >= n_blocks:
                blocks = group_by_owner()
    bar.close()
    return np.array(chosen), np.array(radii)


def as_distance(d2):
    """float64 squared distances -> float32, clipped at 0: the numbers every comparison uses."""
    return np.maximum(d2, 0).astype(np.float32)


# ---------------------------------------------------------------- image score
def reweighted_image_scores(s_star, q, bank, index, num_neighbors):
    """The paper's image score: s* = the image's largest patch score, at test patch q whose
    nearest bank patch is m*; s = (1 - softmax(|q - m|, m in N(m*))[m*]) * s*, with N(m*) the
    num_neighbors nearest bank patches of m* (m* included). s* counts less when m* lies in a
    dense part of the bank, i.e. when q is about as close to m*'s neighbours as to m*.

    s_star [B], q [B, D] in the bank's coordinates (one per image, searched together); index:
    a models.nn_index index over the bank -> [B]."""
    s_star = np.asarray(s_star, np.float32)
    if num_neighbors <= 1:
        return s_star
    m_star = index.search(q, 1)[1][:, 0]
    neighbours = index.search(bank[m_star], num_neighbors)[1]
    dist = np.sqrt(((bank[neighbours] - q[:, None]) ** 2).sum(axis=2, dtype=np.float64))
    # |q - m*| = s*; the softmax is taken relative to the largest distance, within exp's range.
    top = dist.max(axis=1)
    weight = 1.0 - np.exp(s_star - top) / np.exp(dist - top[:, None]).sum(axis=1)
    return (weight * s_star).astype(np.float32)


# ---------------------------------------------------------------- the method
class PatchCore:
    """fit(train batches) -> state; feature_net(state) -> graph; score -> patch maps;
    image_score -> the re-weighted image scores (the Detector's hook)."""

    MATCH_KEYS = ("coreset_ratio",)
    SPLITS_IMAGES = True  # fit(group=...) takes one worker's share of the images

    def __init__(self, config):
        self.config = config
        ratio, neighbours = config.get("coreset_ratio", 0.01), config.get("num_neighbors", 9)
        if not 0 < ratio <= 1:
            raise UserError(f"--coreset_ratio must be in (0, 1] (share of training patches kept), got {ratio:g}")
        if neighbours < 1:
            raise UserError(f"--num_neighbors must be at least 1, got {neighbours}")
        self.ratio, self.num_neighbors = ratio, neighbours
        # Exact nearest-neighbour search (models/nn_index.py): a runtime choice, never saved.
        self.search_kind = config.get("nn_search") or ("faiss" if config.get("faiss") else "grouped")
        if self.search_kind == "faiss":
            import_faiss()
        self._index = None  # (bank array, its index) of the last stats scored

    @staticmethod
    def check_geometry(config, max_stats_gb=None):
        """Any input the backbone tiles; tiles of an image all go into the one memory bank."""
        check_backbone_input(Preprocess.from_config(config).input_shape, "PatchCore")

    def feature_net(self, state):
        if "basis" in state["stats"]:
            raise UserError("this PatchCore model applies its feature basis outside the graph (written before "
                            "the basis was folded into it); train it again")
        net = PatchCoreFeatureNet(self.config["arch"])
        net.set_state_dict(state["net"])
        net.eval()
        return net

    def fit(self, batches, engine_kwargs, weights_path, progress=True, group=None):
        """With `group` (scaleout.Group) each worker passes its share of the images and keeps only
        its share of the patches; the coreset is the one a single process would choose."""
        net, engine = self.feature_engine(weights_path, engine_kwargs)
        parts = self.training_rows(engine, batches(), progress)
        bank, projection = self.select_coreset(parts, progress, group)
        patches = sum(len(p) for p in parts)
        state = {"net": {k: v.numpy() for k, v in net.state_dict().items()}, "stats": {"memory_bank": bank},
                 "projection": projection,
                 "train_patches": patches if group is None else sum(group.gather(patches, "counting the patches"))}
        return state, engine

    def feature_engine(self, weights_path, engine_kwargs):
        """-> (feature net with the backbone weights, its engine)."""
        net = PatchCoreFeatureNet(self.config["arch"])
        net.backbone.load_pretrained(weights_path)
        engine = make_engine(net, Preprocess.from_config(self.config).input_shape, **engine_kwargs)
        return net, engine

    @staticmethod
    def training_rows(engine, batches, progress=False):
        """-> one [B*h*w, D] array of patch features per batch."""
        return [patch_rows(run_in_chunks(engine, images)[0])
                for images in tqdm(batches, desc="features", unit="batch", disable=not progress, leave=False)]

    def select_coreset(self, parts, progress=False, group=None):
        """Training patch rows (a list of arrays, never concatenated: they are the largest
        thing held) -> (memory bank [M, D] in selection order, projection [D, 128]). With
        `group`, this worker's share of the rows; every worker gets the whole bank."""
        dim = parts[0].shape[1]
        _, projection = make_projection("gaussian", [dim], min(PROJECT_DIM, dim), self.config["seed"])
        projected = np.concatenate([(p @ projection).astype(np.float64) for p in parts])
        counts = [len(projected)] if group is None else group.gather(len(projected), "counting the patches")
        n_select = max(1, round(sum(counts) * self.ratio))
        chosen, _ = greedy_k_center(projected, n_select, self.config["seed"], progress=progress, group=group,
                                    overwrite=True)
        del projected
        start = sum(counts[:0 if group is None else group.rank])
        offsets = start + np.cumsum([0] + [len(p) for p in parts])
        mine = np.flatnonzero((chosen >= offsets[0]) & (chosen < offsets[-1]))
        part = np.searchsorted(offsets, chosen[mine], side="right") - 1
        rows = [parts[i][j] for i, j in zip(part, chosen[mine] - offsets[part])]
        if group is None:
            return np.stack(rows), projection
        bank = np.zeros((n_select, dim), np.float32)  # each row from its owner, zeros elsewhere: the sum is exact
        bank[mine] = rows
        return group.all_reduce_sum(bank, "collecting the memory bank", np.float32), projection

    def nearest_index(self, stats):
        """The search index of the bank, built once per bank (grouped: 0.5-0.8 s for 10% of bottle)."""
        bank = stats["memory_bank"]
        if self._index is None or self._index[0] is not bank:
            self._index = (bank, build_index(bank, self.search_kind))
        return self._index[1]

    def score(self, outputs, stats):
        """Patch score = distance to the nearest memory-bank patch: [B, h, w]."""
        b, _, h, w = outputs[0].shape
        dist, _ = self.nearest_index(stats).search(patch_rows(outputs[0]), 1)
        return dist[:, 0].reshape(b, h, w)

    def image_score(self, outputs, patch_scores, stats):
        """The Detector's image-score hook: re-weighted largest patch score per image [B]."""
        flat = patch_scores.reshape(len(patch_scores), -1)
        worst = flat.argmax(axis=1)
        features = outputs[0].reshape(len(flat), outputs[0].shape[1], -1)
        q = np.ascontiguousarray(features[np.arange(len(flat)), :, worst])
        return reweighted_image_scores(flat[np.arange(len(flat)), worst], q, stats["memory_bank"],
                                       self.nearest_index(stats), self.num_neighbors)
