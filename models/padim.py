"""PaDiM / OrthoAD: a Gaussian per feature position over reduced backbone features.

Reduction (`--method`): `sample` (random channel subset, PaDiM), `h_sample` (subset drawn
per layer in proportion to its channels), `ortho` (random semi-orthogonal projection,
OrthoAD), `svd_ortho` (top-k right singular vectors of the training features), `gaussian`
(random Gaussian projection). The reduction is part of the static feature graph, so the
deployed model outputs k channels and the statistics never see the full C.

Fit streams: sums and outer products are accumulated batch by batch (shifted by the
first batch's mean so float32 accumulators stay accurate); no training feature is kept.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from threadpoolctl import ThreadpoolController
from tqdm import tqdm

from models.backbone import ResNetFeatures, concat_to_first, make_engine
from utils import UserError

PROJECTIONS = ("sample", "h_sample", "ortho", "svd_ortho", "gaussian")
LAYERS = ("layer1", "layer2", "layer3")
EPSILON = 0.01        # covariance regulariser, as in PaDiM
POSITION_CHUNK = 256  # positions per vectorised step (at most; see position_chunk)
INVERT_CHUNK = 32     # float64 temporaries of the inversion: 32*k*k*8 bytes per thread
ACCUMULATE_IMAGES = 32  # outer products over 32 images per matmul run ~2x faster than over 8...
ACCUMULATE_BYTES = 64 << 20  # ...but the feature buffer stays under 64 MB (WRN50 k=300: 17 images)


def position_chunk(k):
    """Positions per step so that a [chunk, k, k] float32 temporary stays near 16 MB."""
    return int(max(16, min(POSITION_CHUNK, (4 << 20) // (k * k))))


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
        f = concat_to_first(self.backbone(x))
        if self.kind == "index":
            return paddle.index_select(f, self.projection, axis=1)
        if self.kind == "matrix":
            return F.conv2d(f, self.projection)
        return f


# ---------------------------------------------------------------- statistics
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
_BLAS = ThreadpoolController()


def over_positions(fn, n_positions, chunk):
    """Run fn(lo) for every chunk of positions (or rows), one thread per core. Each matrix is
    small, so BLAS's own threading only adds overhead: it is held at one thread while chunks
    run in parallel (numpy and LAPACK release the GIL)."""
    with _BLAS.limit(limits=1):
        list(_POOL.map(fn, range(0, n_positions, chunk)))



class GaussianAccumulator:
    """Running per-position mean and covariance from [B, k, P] feature batches."""

    def __init__(self):
        self.n = 0
        self.shift = self.total = self.outer = None

    def update(self, feats):
        b, k = feats.shape[:2]
        x = feats.reshape(b, k, -1).transpose(2, 0, 1)  # [P, B, k]
        if self.shift is None:
            self.shift = x.mean(axis=1).astype(np.float32)
            self.total = np.zeros(self.shift.shape, np.float64)
            self.outer = np.zeros((x.shape[0], k, k), np.float32)

        step = position_chunk(k)

        def accumulate(lo):
            xc = x[lo:lo + step] - self.shift[lo:lo + step, None, :]
            self.total[lo:lo + step] += xc.sum(axis=1)
            self.outer[lo:lo + step] += np.matmul(xc.transpose(0, 2, 1), xc)

        over_positions(accumulate, x.shape[0], step)
        self.n += b

    def finalize(self, epsilon=EPSILON):
        """-> mean [P, k], precision [P, k, k] float32 = inv(cov + eps*I); reuses the
        outer-product buffer so the peak stays at one P*k*k array."""
        if self.n < 2:
            raise UserError("at least 2 training images are needed to fit a covariance")
        n = self.n
        m = self.total / n
        eye = np.eye(self.outer.shape[1]) * epsilon

        def invert(lo):
            hi = lo + INVERT_CHUNK
            cov = self.outer[lo:hi].astype(np.float64)
            cov -= n * m[lo:hi, :, None] * m[lo:hi, None, :]
            cov /= n - 1
            cov += eye
            self.outer[lo:hi] = np.linalg.inv(cov)

        over_positions(invert, len(m), chunk=INVERT_CHUNK)
        mean = (self.shift + m).astype(np.float32)
        precision, self.outer = self.outer, None
        return mean, precision


def mahalanobis(feats, mean, precision):
    """feats [B, k, H, W], mean [P, k], precision [P, k, k] -> distances [B, H, W] float32."""
    b, k, h, w = feats.shape
    x = feats.reshape(b, k, h * w).transpose(2, 0, 1)  # [P, B, k]
    out = np.empty((h * w, b), np.float32)
    step = position_chunk(k)

    def distance(lo):
        d = x[lo:lo + step] - mean[lo:lo + step, None, :]
        out[lo:lo + step] = np.einsum("pbk,pbk->pb", np.matmul(d, precision[lo:lo + step]), d)

    over_positions(distance, h * w, step)
    return np.sqrt(np.maximum(out, 0)).T.reshape(b, h, w)


# ---------------------------------------------------------------- the method
class PaDiM:
    """fit(train batches) -> state; feature_net(state) -> graph; score(outputs, stats) -> patch maps."""

    MATCH_KEYS = ("k",)

    def __init__(self, config):
        self.config = config
        if config["method"] not in PROJECTIONS:
            raise UserError(f"unknown --method {config['method']}")

    def _channels(self):
        return ResNetFeatures(self.config["arch"], LAYERS).channels()

    def feature_net(self, state):
        net = PaDiMFeatureNet(self.config["arch"], state["projection_kind"], state["projection"])
        net.set_state_dict(state["net"])
        net.eval()
        return net

    def fit(self, batches, engine_kwargs, weights_path, progress=True):
        """`batches`: a callable returning a fresh iterator of image batches (svd_ortho reads twice)."""
        cfg = self.config
        shape = (3, cfg["crop_size"], cfg["crop_size"])
        net = PaDiMFeatureNet(cfg["arch"])
        net.backbone.load_pretrained(weights_path)
        gram = None
        if cfg["method"] == "svd_ortho":  # a first pass over the full-channel features
            gram = _gram_matrix(make_engine(net, shape, **engine_kwargs), batches(), progress)
        kind, projection = make_projection(cfg["method"], self._channels(), cfg["k"], cfg["seed"], gram)
        net.set_projection(kind, projection)
        engine = make_engine(net, shape, **engine_kwargs)
        acc = GaussianAccumulator()
        buffer, filled = None, 0
        for images in tqdm(batches(), desc="fit", unit="batch", disable=not progress, leave=False):
            for i in range(len(images)):
                f = engine(images[i:i + 1])[0]
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
        mean, precision = acc.finalize()
        state = {"projection_kind": kind, "projection": projection,
                 "net": {k: v.numpy() for k, v in net.state_dict().items()},
                 "stats": {"mean": mean, "precision": precision}}
        return state, engine

    @staticmethod
    def score(outputs, stats):
        return mahalanobis(outputs[0], stats["mean"], stats["precision"])


def run_in_chunks(engine, images, chunk=1):
    """Batch 1 is the fastest Paddle Inference shape on CPU (oneDNN, cache-resident)."""
    parts = [engine(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def _gram_matrix(engine, batches, progress):
    """Centred C x C Gram matrix of all training feature vectors (for svd_ortho)."""
    s = g = None
    n = 0
    for images in tqdm(batches, desc="svd", unit="batch", disable=not progress, leave=False):
        f = run_in_chunks(engine, images)[0]
        x = f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1]).astype(np.float64)
        s = x.sum(0) if s is None else s + x.sum(0)
        g = x.T @ x if g is None else g + x.T @ x
        n += len(x)
    return g - np.outer(s, s) / n
