"""Pictures of what was found: image, ground truth, heat-map overlay, predicted mask, outline.

Heat maps use the calibrated scale (threshold at 0.5, fixed 0..1 range), so colours compare
across the images of a category instead of being stretched per image.
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from models.postprocess import prediction_fields  # noqa: E402
from utils import UserError, atomic_path, refuse_overwrite, save_npy_atomic  # noqa: E402


def outline(rgb, mask, color=(255, 0, 0)):
    out = rgb.copy()
    edge = find_boundaries(mask.astype(bool), mode="thick")
    out[edge] = color
    return out


def save_prediction_figure(path, rgb, anomaly_map, pred_mask, gt_mask=None, title=None):
    """One row of panels; `anomaly_map` is calibrated (0..1, threshold 0.5)."""
    panels = 4 + (gt_mask is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3.2))
    i = 0
    axes[i].imshow(rgb)
    axes[i].set_title("Image")
    if gt_mask is not None:
        i += 1
        axes[i].imshow(gt_mask, cmap="gray", vmin=0, vmax=1)
        axes[i].set_title("Ground truth")
    i += 1
    axes[i].imshow(rgb)
    heat = axes[i].imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    axes[i].set_title("Heat map")
    axes[i + 1].imshow(pred_mask, cmap="gray", vmin=0, vmax=1)
    axes[i + 1].set_title("Predicted mask")
    axes[i + 2].imshow(outline(rgb, pred_mask))
    axes[i + 2].set_title("Segmentation")
    for ax in axes:
        ax.axis("off")
    cbar = fig.colorbar(heat, ax=list(axes), fraction=0.015, pad=0.01)
    cbar.set_label("calibrated score (0.5 = threshold)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def save_mask_png(path, mask):
    from PIL import Image
    with atomic_path(path) as tmp:
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(tmp, format="PNG")


# ---------------------------------------------------------------- prediction outputs
def output_stems(paths):
    """File stem per input; inputs sharing a name (test/good/000.png, test/crack/000.png) get
    their folder prefixed so that one never overwrites another."""
    stems = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
    counts = {}
    for s in stems.values():
        counts[s] = counts.get(s, 0) + 1
    return {p: (f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}" if counts[s] > 1 else s)
            for p, s in stems.items()}


def prediction_paths(out_dir, stem):
    return {"anomaly_map": os.path.join(out_dir, f"{stem}_anomaly_map.npy"),
            "pred_mask": os.path.join(out_dir, f"{stem}_pred_mask.png"),
            "overlay": os.path.join(out_dir, f"{stem}_overlay.png")}


def write_prediction(out_dir, image_path, stem, rgb, pred, save_pic, overwrite, model_version=None):
    """Shared by predict.py and infer.py: same files, same JSON record (with the version of the
    model that answered)."""
    files = prediction_paths(out_dir, stem)
    if not save_pic:
        files.pop("overlay")
    if os.path.abspath(image_path) in {os.path.abspath(p) for p in files.values()}:
        raise UserError(f"output would overwrite the input image {image_path}")
    refuse_overwrite(files.values(), overwrite)
    save_npy_atomic(files["anomaly_map"], pred["anomaly_map"])
    save_mask_png(files["pred_mask"], pred["pred_mask"])
    if save_pic:
        save_prediction_figure(files["overlay"], rgb, pred["anomaly_map"], pred["pred_mask"],
                               title=f"{os.path.basename(image_path)}  score {pred['pred_score']:.3f}  "
                                     f"{'anomalous' if pred['pred_label'] else 'normal'}")
    record = {"image_path": image_path, **prediction_fields(pred), "model_version": model_version, **files}
    print(json.dumps(record))
    return record
