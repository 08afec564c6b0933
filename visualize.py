"""Pictures of what was found: image, ground truth, heat-map overlay, predicted mask, outline.

Heat maps use the calibrated scale (threshold at 0.5, fixed 0..1 range), so colours compare
across the images of a category instead of being stretched per image.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from utils import atomic_path  # noqa: E402


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
