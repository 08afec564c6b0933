"""Per-image files of the report: gallery JPEGs (with a full-size copy when larger than a
thumbnail), the calibrated anomaly map as a 16-bit PNG and the predicted mask."""
import os

import cv2
import matplotlib
import numpy as np
from PIL import Image

from models.postprocess import normalize

THUMB_PX = 256                 # gallery images; larger crops also get a full-size copy for the viewer
JPEG_QUALITY = 85
MAP_BITS = 12                  # anomaly-map precision inside the 16-bit PNG: full 16 bits is ~70 KB
                               # of noise per map and would break the size budget on MVTec
GT_COLOR = (255, 0, 255)       # magenta: absent from both the jet scale and most product images
JET = (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint16)
LABEL_NAMES = ("normal", "anomalous")
OUTCOMES = ("TP", "FP", "FN", "TN")


def outcome_of(label, pred):
    return ("TN", "FP", "FN", "TP")[2 * int(label) + int(pred)]


def gt_outline(mask):
    """Two-pixel ring on the ground-truth border (cv2 morphology: ~50x faster than skimage)."""
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0


def save_jpeg(root, rel, rgb):
    """Write the JPEG at `rel`; if larger than a thumbnail, that is the full-size copy and the
    thumbnail goes beside it. -> (thumbnail path, full-size path), both relative."""
    img = Image.fromarray(rgb)
    if max(img.size) <= THUMB_PX:
        img.save(os.path.join(root, rel), quality=JPEG_QUALITY)
        return rel, rel
    thumb_rel = rel[:-4] + "_thumb.jpg"
    img.save(os.path.join(root, rel), quality=JPEG_QUALITY)
    img.thumbnail((THUMB_PX, THUMB_PX), Image.BILINEAR)
    img.save(os.path.join(root, thumb_rel), quality=JPEG_QUALITY)
    return thumb_rel, rel


def save_map_png16(path, calibrated):
    """Calibrated map as 16-bit grey PNG: value / 65535 = calibrated score (0.5 = threshold)."""
    q = np.round(calibrated * (2 ** MAP_BITS - 1)).astype(np.uint16)
    # Bit replication widens the quantised value so that 1.0 maps exactly to 65535.
    if not cv2.imwrite(path, (q << (16 - MAP_BITS)) | (q >> (2 * MAP_BITS - 16)), [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"cannot write {path}")


def write_image_files(root, stem, rgb, raw_map, gt_mask, calibration):
    """Gallery pictures and prediction files of one test image; `gt_mask` None (a category
    without masks) draws no ground-truth outline. -> paths relative to `root`."""
    c = calibration
    calibrated = normalize(raw_map, c["pixel_threshold"], c["pixel_min"], c["pixel_max"])
    return write_calibrated_files(root, stem, rgb, calibrated, raw_map >= c["pixel_threshold"], gt_mask)


def write_calibrated_files(root, stem, rgb, calibrated, pred_mask, gt_mask=None):
    """The same files from a calibrated map and predicted mask (what predict.py and infer.py
    answer: the page shows the very numbers they print)."""
    image = rgb.copy()
    heat = ((rgb.astype(np.uint16) + JET[(calibrated * 255 + 0.5).astype(np.uint8)]) >> 1).astype(np.uint8)
    if gt_mask is not None:
        edge = gt_outline(gt_mask)
        image[edge] = GT_COLOR
        heat[edge] = GT_COLOR
    files = {}
    files["image"], files["image_full"] = save_jpeg(root, f"images/{stem}.jpg", image)
    files["heat_map"], files["heat_map_full"] = save_jpeg(root, f"heat/{stem}.jpg", heat)
    files["anomaly_map"] = f"maps/{stem}.png"
    save_map_png16(os.path.join(root, files["anomaly_map"]), calibrated)
    files["pred_mask"] = f"masks/{stem}.png"
    Image.fromarray(np.asarray(pred_mask).astype(bool)).save(os.path.join(root, files["pred_mask"]))
    return files
