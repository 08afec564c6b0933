"""Post-processing shared by every entry point (train/eval/predict in eager or inference mode,
infer.py in deployment): patch scores -> anomaly map -> calibrated score, label and mask.

Keeping this in one module is what makes predict.py and infer.py agree number for number.
"""
import functools

import numpy as np

from models.backbone import run_in_chunks
from models.parallel import single_threaded_blas

BLUR_SIGMA = 4.0
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter


def gaussian_kernel(sigma):
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(4 sigma + 0.5), normalised."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=16)
def map_operator(in_size, out_size, sigma):
    """[out, in] float32 matrix of one axis of `anomaly_maps`: bilinear upsampling with half-pixel
    centres (cv2.INTER_LINEAR, F.interpolate(align_corners=False)), then the Gaussian blur with
    scipy's 'reflect' border. Both steps are linear and separable, so a map is A @ p @ A.T:
    two small matrix products instead of a resize and a 33-tap filter over 224^2 (~5x faster)."""
    up = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = (i + 0.5) * in_size / out_size - 0.5
        lo = int(np.floor(src))
        frac = src - lo
        if lo < 0:
            lo, frac = 0, 0.0
        if lo >= in_size - 1:
            lo, frac = in_size - 1, 0.0
        up[i, lo] += 1.0 - frac
        if frac:
            up[i, lo + 1] += frac
    if not sigma:
        return up.astype(np.float32)
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    blur = np.zeros((out_size, out_size))
    for i in range(out_size):
        for t, weight in enumerate(kernel):
            j = i + t - radius
            while not 0 <= j < out_size:  # reflect about the edge: ... b a | a b c ... (scipy 'reflect')
                j = -j - 1 if j < 0 else 2 * out_size - j - 1
            blur[i, j] += weight
    return (blur @ up).astype(np.float32)


def anomaly_maps(patch_scores, out_size, sigma=BLUR_SIGMA):
    """[B, h, w] patch scores -> [B, H, W] maps (`out_size`: (H, W), or S for S x S): bilinear
    upsample (half-pixel centres, like F.interpolate(align_corners=False)) then a Gaussian blur
    with sigma 4 (map_operator)."""
    out_h, out_w = (out_size, out_size) if np.isscalar(out_size) else out_size
    patch_scores = np.asarray(patch_scores, np.float32)
    rows = map_operator(patch_scores.shape[1], int(out_h), float(sigma))
    cols = map_operator(patch_scores.shape[2], int(out_w), float(sigma))
    return np.ascontiguousarray(np.matmul(np.matmul(rows, patch_scores), cols.T), dtype=np.float32)


def normalize(values, threshold, low, high):
    """Calibrated scale: `threshold` maps to 0.5, the calibration range spans 1, clipped to [0, 1].
    The same for every image, so a calibrated score means the same across images."""
    span = max(float(high) - float(low), 1e-12)
    return np.clip((np.asarray(values, np.float32) - threshold) / span + 0.5, 0.0, 1.0)


def prediction_fields(pred):
    """The answer fields of one calibrated prediction, as infer.py writes them and the service
    answers them (one definition: the two must agree)."""
    return {"pred_score": round(pred["pred_score"], 6),
            "pred_label": "anomalous" if pred["pred_label"] else "normal", "raw_score": pred["raw_score"]}


class Detector:
    """images [B,3,H,W] -> raw image scores and maps, and the calibrated uniform output.

    `engine`: callable images -> list of feature arrays (Paddle Inference, eager, or ONNX Runtime);
    `score`: the method's pure-numpy scorer (outputs, stats) -> [B, h, w] patch scores;
    `image_score`: optional (outputs, patch scores, stats) -> [B] for methods whose image score
    is not the map maximum (PatchCore's re-weighting);
    `tiles`: the model's datasets.tiling.TileGrid when the network sees tiles of the image: the
    engine is then wrapped to take whole images (TiledEngine) and the tiles' maps are stitched;
    `tile_border`: pixels along each map's edges the method leaves unscored (EfficientAD), left
    out of the stitching wherever another tile scores them.
    """

    def __init__(self, engine, score, stats, map_size, calibration=None, blur_sigma=BLUR_SIGMA, image_score=None,
                 tiles=None, tile_border=0):
        self.tiles = tiles
        self.tile_border = tile_border
        self.engine = engine if tiles is None else TiledEngine(engine, tiles)
        self.score = score
        self.image_score = image_score
        self.stats = stats
        self.map_size = tuple(map_size)  # (H, W) of the maps: the preprocessed image's size
        self.calibration = calibration
        self.blur_sigma = blur_sigma
        # Images per engine call in `features`: 1 is the fastest on CPU; 0 = the whole batch (GPU).
        self.engine_chunk = 1

    @classmethod
    def for_method(cls, method, engine, stats, map_size, calibration=None, tiles=None):
        """The detector of a method: its scorer, image score and blur. Every entry point builds
        it here, so none can pair a method with another's post-processing."""
        return cls(engine, method.score, stats, map_size, calibration, image_score=getattr(method, "image_score", None),
                   blur_sigma=getattr(method, "blur_sigma", BLUR_SIGMA), tiles=tiles,
                   tile_border=getattr(method, "map_border", 0))

    def features(self, images):
        """Engine outputs of a whole batch [B,3,H,W], concatenated. On CPU the network runs image
        by image (under oneDNN batch 8 measured no faster per image than batch 1, and the outputs
        are bit-identical); the scoring that follows sees the whole batch at once."""
        return run_in_chunks(self.engine, images, self.engine_chunk or len(images))

    def raw(self, images):
        """-> (image scores [B], maps [B,H,W]): one scoring pass over the batch, so a batch
        reads the statistics once (PaDiM) and searches its queries together (PatchCore)."""
        return self.postprocess(self.features(images))

    def postprocess(self, outputs):
        """Engine outputs -> (image scores [B], maps [B,H,W]); image score = map maximum
        unless the method supplies `image_score`."""
        # One BLAS thread per caller: the scorers parallelise over positions themselves, and
        # BLAS worker threads, which spin for a while after each product, would take the
        # cores from the next image's oneDNN forward (PatchCore's forward ran 2.7x slower).
        with single_threaded_blas():
            patch_scores = self.score(outputs, self.stats)
            if self.tiles is not None:
                return self.stitched(outputs, patch_scores)
            maps = anomaly_maps(patch_scores, self.map_size, self.blur_sigma)
            if self.image_score is not None:
                return self.image_score(outputs, patch_scores, self.stats), maps
            return maps.reshape(len(maps), -1).max(axis=1), maps

    def stitched(self, outputs, patch_scores):
        """Tiled models: engine outputs and patch scores of every tile -> (image scores [B], maps
        [B,H,W]). Each tile's scores are upsampled to the tile, the tiles averaged where they
        overlap, and the blur runs over the whole frame (no seams at tile edges). Image score:
        the map maximum, or the method's image score of the tile holding the largest patch
        score (PatchCore: its re-weighting of the largest patch score over all tiles)."""
        tiles = self.tiles
        maps = tiles.stitch(anomaly_maps(patch_scores, (tiles.tile, tiles.tile), 0.0), self.tile_border)
        if self.blur_sigma:
            maps = anomaly_maps(maps, self.map_size, self.blur_sigma)
        if self.image_score is None:
            return maps.reshape(len(maps), -1).max(axis=1), maps
        per_tile = patch_scores.reshape(len(maps), tiles.count, -1).max(axis=2)
        best = per_tile.argmax(axis=1) + tiles.count * np.arange(len(maps))
        return self.image_score([o[best] for o in outputs], patch_scores[best], self.stats), maps

    def predict(self, images):
        """Uniform output per image: pred_score, pred_label, anomaly_map, pred_mask (calibrated)."""
        scores, maps = self.raw(images)
        return self.calibrated(scores, maps)

    def calibrated(self, scores, maps):
        c = self.calibration
        if not c:
            raise ValueError("the model has no calibrated thresholds")
        out = []
        for s, m in zip(scores, maps):
            out.append({
                "raw_score": float(s),
                "pred_score": float(normalize(s, c["image_threshold"], c["image_min"], c["image_max"])),
                "pred_label": int(s >= c["image_threshold"]),
                "anomaly_map": normalize(m, c["pixel_threshold"], c["pixel_min"], c["pixel_max"]),
                "pred_mask": (m >= c["pixel_threshold"]).astype(np.uint8),
            })
        return out


class TiledEngine:
    """An engine for tiled models that takes whole preprocessed images [B,3,H,W]: it cuts them
    into the tiles the network was built for and returns the outputs of every tile, image by
    image ([B * tiles, ...]), for Detector.stitched."""

    def __init__(self, engine, tiles):
        self.engine = engine
        self.tiles = tiles

    def __call__(self, images):
        return run_in_chunks(self.engine, self.tiles.split(np.asarray(images, np.float32)))  # batch 1: fastest on CPU
