"""PaDiM / OrthoAD: a Gaussian per feature position over reduced backbone features.

Reduction (`--method`): `sample` (random channel subset, PaDiM), `h_sample` (subset drawn
per layer in proportion to its channels), `ortho` (random semi-orthogonal projection,
OrthoAD), `svd_ortho` (top-k right singular vectors of the training features), `gaussian`
(random Gaussian projection). The reduction is part of the static feature graph, so the
deployed model outputs k channels and the statistics never see the full C.

The statistics (accumulation, exact sums, inversion, packed storage, the distance kernel)
live in models/gaussian.py.
"""

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from tqdm import tqdm

from datasets.transforms import Preprocess
from models.backbone import ResNetFeatures, check_backbone_input, concat_to_first, make_engine, run_in_chunks
from models.gaussian import ExactSums, GaussianAccumulator, finalize_over, mahalanobis
from utils import UserError

PROJECTIONS = ("sample", "h_sample", "ortho", "svd_ortho", "gaussian")
LAYERS = ("layer1", "layer2", "layer3")
ACCUMULATE_IMAGES = 32  # outer products over 32 images per matmul run ~2x faster than over 8...
ACCUMULATE_BYTES = 64 << 20  # ...but the feature buffer stays under 64 MB (WRN50 k=300: 17 images)


# ---------------------------------------------------------------- projections
def make_projection(method, layer_channels, k, seed, gram=None):
    """-> ('index', int64 [k]) or ('matrix', float32 [C, k]). `gram` (C x C, centred) for svd_ortho."""
    total = int(sum(layer_channels))
    if not 0 < k <= total:
        raise UserError(f"--k must be between 1 and {total} (the feature channels), got {k}")
    rng = np.random.RandomState(seed)
    if method == "sample":
        return "index", np.sort(rng.choice(total, k, replace=False)).astype(np.int64)
    if method == "h_sample":
        # Largest-remainder apportionment of k over the layers, then a subset within each.
        share = np.array(layer_channels, dtype=np.float64) * k / total
        counts = np.floor(share).astype(int)
        for i in np.argsort(-(share - counts))[: k - counts.sum()]:
            counts[i] += 1
        offsets = np.concatenate([[0], np.cumsum(layer_channels)[:-1]])
        idx = [off + rng.choice(c, n, replace=False) for off, c, n in zip(offsets, layer_channels, counts)]
        return "index", np.sort(np.concatenate(idx)).astype(np.int64)
    if method == "gaussian":
        return "matrix", (rng.standard_normal((total, k)) / np.sqrt(k)).astype(np.float32)
    if method == "ortho":
        q, r = np.linalg.qr(rng.standard_normal((total, k)))
        return "matrix", (q * np.sign(np.diag(r))).astype(np.float32)  # sign fix: unique Haar sample
    if method == "svd_ortho":
        if gram is None:
            raise ValueError("svd_ortho needs the training features' Gram matrix")
        # Right singular vectors of the centred feature matrix = eigenvectors of its Gram matrix.
        vals, vecs = np.linalg.eigh(gram)
        vecs = vecs[:, np.argsort(vals)[::-1][:k]]
        vecs *= np.sign(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(k)])  # deterministic signs
        return "matrix", vecs.astype(np.float32)
    raise UserError(f"unknown --method {method}; choose one of {', '.join(PROJECTIONS)}")


class PaDiMFeatureNet(nn.Layer):
    """image -> reduced embedding [B, k, H/4, W/4] (or the full C channels with no projection)."""

    def __init__(self, arch, kind=None, projection=None):
        super().__init__()
        self.backbone = ResNetFeatures(arch, LAYERS)
        self.kind = None
        if kind is not None:
            self.set_projection(kind, projection)

    def set_projection(self, kind, projection):
        self.kind = kind
        if kind == "index":
            self.register_buffer("projection", paddle.to_tensor(projection))
        else:
            self.register_buffer("projection", paddle.to_tensor(np.ascontiguousarray(projection.T)[:, :, None, None]))

    def forward(self, x):
        feats = self.backbone(x)
        if self.kind == "matrix":
            # A 1x1 projection commutes with nearest upsampling: project each layer at its own
            # resolution and upsample k channels, instead of building the full C-channel
            # concatenation at the first layer's resolution (~8% of the R18 forward).
            size = feats[0].shape[-2:]
            out, lo = None, 0
            for f in feats:
                part = F.conv2d(f, self.projection[:, lo:lo + f.shape[1]])
                lo += f.shape[1]
                out = part if out is None else out + F.interpolate(part, size=size, mode="nearest")
            return out
        f = concat_to_first(feats)
        if self.kind == "index":
            return paddle.index_select(f, self.projection, axis=1)
        return f


def positions_of_tiles(feats, tiles):
    """[B * tiles, k, h, w] features of each image's tiles -> [B, k, tiles * h, w]: with tiling,
    every position of every tile is its own Gaussian (tile i holds rows i*h .. i*h+h-1)."""
    if tiles == 1:
        return feats
    bn, k, h, w = feats.shape
    return feats.reshape(bn // tiles, tiles, k, h, w).transpose(0, 2, 1, 3, 4).reshape(bn // tiles, k, tiles * h, w)


def statistics_bytes(config):
    """(bytes the fit accumulates: float32 k x k per position, bytes of the packed model
    statistics) for a PaDiM config: positions = (H/4 x W/4 of the network input) x tiles."""
    preprocess = Preprocess.from_config(config)
    _, h, w = preprocess.input_shape
    tiles = preprocess.tiles.count if preprocess.tiles else 1
    positions, k = tiles * (h // 4) * (w // 4), int(config["k"])
    return positions * k * k * 4, positions * (k * (k + 1) + 4 * k + 4)


# ---------------------------------------------------------------- the method
class PaDiM:
    """fit(train batches) -> state; feature_net(state) -> graph; score(outputs, stats) -> patch maps."""

    MATCH_KEYS = ("k",)
    SPLITS_IMAGES = True  # fit(group=...) takes one worker's share of the images

    def __init__(self, config):
        self.config = config
        if config["method"] not in PROJECTIONS:
            raise UserError(f"unknown --method {config['method']}")

    @staticmethod
    def check_geometry(config, max_stats_gb=None):
        """Before any fit: an input the backbone tiles, and statistics within `max_stats_gb`."""
        check_backbone_input(Preprocess.from_config(config).input_shape, "PaDiM/OrthoAD")
        if max_stats_gb is None:
            return
        fit_bytes, file_bytes = statistics_bytes(config)
        if fit_bytes > max_stats_gb * 1e9:
            raise UserError(f"the statistics would need {fit_bytes / 1e9:.1f} GB while fitting "
                            f"({file_bytes / 1e9:.1f} GB in the model file), over --max_stats_gb {max_stats_gb:g}: "
                            f"lower --k, --image_size or the number of tiles, or raise --max_stats_gb")

    def _channels(self):
        return ResNetFeatures(self.config["arch"], LAYERS).channels()

    def feature_net(self, state):
        net = PaDiMFeatureNet(self.config["arch"], state["projection_kind"], state["projection"])
        net.set_state_dict(state["net"])
        net.eval()
        net.int8_graph = state.get("int8_graph")  # what --precision int8 runs (models/quantize.py)
        return net

    def fit(self, batches, engine_kwargs, weights_path, progress=True, group=None, keep_sums=False):
        """`batches`: a callable returning a fresh iterator of image batches (svd_ortho reads twice).
        With `group` (scaleout.Group) each worker passes its share of the images and the float64
        statistics are summed over the workers; keep_sums: state["sums"] holds them for --update."""
        cfg = self.config
        preprocess = Preprocess.from_config(cfg)
        shape, tiles = preprocess.input_shape, preprocess.tiles.count if preprocess.tiles else 1
        net = PaDiMFeatureNet(cfg["arch"])
        net.backbone.load_pretrained(weights_path)
        gram = None
        if cfg["method"] == "svd_ortho":  # a first pass over the full-channel features
            # The projection is chosen on fp32 features; int8 quantises the projected network below.
            gram = _gram_matrix(make_engine(net, shape, **dict(engine_kwargs, precision="fp32", calibration=None)),
                                batches(), progress, group)
        kind, projection = make_projection(cfg["method"], self._channels(), cfg["k"], cfg["seed"], gram)
        net.set_projection(kind, projection)
        engine = make_engine(net, shape, **engine_kwargs)
        acc = ExactSums() if group is not None or keep_sums else GaussianAccumulator()
        accumulate(engine, batches(), acc, progress, tiles)
        if group is None:
            sums = acc.sums() if keep_sums else None
            mean, packed, scale = acc.finalize()
        else:
            (mean, packed, scale), sums = finalize_over(acc, group, keep_sums)
        state = {"projection_kind": kind, "projection": projection,
                 "net": {k: v.numpy() for k, v in net.state_dict().items()},
                 "stats": {"mean": mean, "precision_packed": packed, "precision_scale": scale}}
        if getattr(net, "int8_graph", None) is not None:
            state["int8_graph"] = net.int8_graph
        if tiles > 1:
            state["stats"]["tiles"] = np.array(tiles)  # score() regroups each image's tiles (deployment too)
        if sums is not None:
            state["sums"] = sums
        return state, engine

    def update(self, state, sums, batches, engine_kwargs, progress=True):
        """Add images to a fitted model: its saved float64 sums plus those of `batches` (run through
        the model's own network and projection) -> (new stats, new sums, engine)."""
        preprocess = Preprocess.from_config(self.config)
        engine = make_engine(self.feature_net(state), preprocess.input_shape, **engine_kwargs)
        acc = ExactSums()
        acc.add_sums(sums)
        accumulate(engine, batches(), acc, progress, preprocess.tiles.count if preprocess.tiles else 1)
        sums = acc.sums()
        mean, packed, scale = acc.finalize()
        return {"mean": mean, "precision_packed": packed, "precision_scale": scale}, sums, engine

    @staticmethod
    def score(outputs, stats):
        if "precision_packed" not in stats:
            raise UserError("this PaDiM/OrthoAD model stores full precision matrices (written before the "
                            "packed format); train it again")
        tiles = int(stats.get("tiles", 1))
        feats = positions_of_tiles(outputs[0], tiles)
        distances = mahalanobis(feats, stats["mean"], stats["precision_packed"], stats["precision_scale"])
        return distances.reshape(len(outputs[0]), *outputs[0].shape[2:])  # back to one map per tile


def accumulate(engine, batches, acc, progress, tiles=1):
    """Run every image of `batches` (network inputs: with tiling, each image's `tiles` tiles in a
    row) through `engine` into the GaussianAccumulator `acc`, one image's positions at a time."""
    buffer, filled = None, 0
    for images in tqdm(batches, desc="fit", unit="batch", disable=not progress, leave=False):
        for i in range(0, len(images), tiles):
            f = positions_of_tiles(run_in_chunks(engine, images[i:i + tiles])[0], tiles)
            if buffer is None:
                per_image = f.nbytes
                buffer = np.empty((max(1, min(ACCUMULATE_IMAGES, ACCUMULATE_BYTES // per_image)),) + f.shape[1:],
                                  np.float32)
            buffer[filled] = f[0]
            filled += 1
            if filled == len(buffer):
                acc.update(buffer)
                filled = 0
    if filled:
        acc.update(buffer[:filled])


def _gram_matrix(engine, batches, progress, group=None):
    """Centred C x C Gram matrix of all training feature vectors (for svd_ortho), summed over
    the workers of `group`."""
    s = g = None
    n = 0
    for images in tqdm(batches, desc="svd", unit="batch", disable=not progress, leave=False):
        f = run_in_chunks(engine, images)[0]
        x = f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1]).astype(np.float64)
        s = x.sum(0) if s is None else s + x.sum(0)
        g = x.T @ x if g is None else g + x.T @ x
        n += len(x)
    if group is not None:
        n = group.all_reduce_sum([n], "summing the feature counts")[0]
        s = group.all_reduce_sum(s, "summing the features")
        g = group.all_reduce_sum(g, "summing the Gram matrices")
    return g - np.outer(s, s) / n
