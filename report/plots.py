"""Per-category plots of the report: image-score histogram, image ROC and the PRO curve."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from report.metrics import PRO_FPR_LIMIT  # noqa: E402
from utils import fmt  # noqa: E402


def save_plot(fig, path):
    fig.subplots_adjust(left=0.17, right=0.96, bottom=0.16, top=0.9)  # tight_layout costs a full draw
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_rate_plot(fig, ax, path, title, xlabel, ylabel):
    """A curve of rates: both axes from 0 to 1."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    save_plot(fig, path)


def note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def thin_curve(x, y, points=800):
    """Millions of PRO points plot no sharper than a few hundred and take seconds to draw."""
    idx = np.unique(np.searchsorted(x, np.linspace(0.0, x[-1], points)).clip(0, len(x) - 1))
    return x[idx], y[idx]


def write_plots(root, category, result):
    """-> {kind: path relative to `root`}; the PRO plot's path is None for a category without
    masks (the page shows a note instead of an empty plot)."""
    a, c, rep = result["arrays"], result["calibration"], result["image_report"]
    scores, labels = a["scores"], a["labels"].astype(bool)
    both_classes = labels.any() and not labels.all()
    files = {kind: f"plots/{category}/{kind}.png" for kind in ("histogram", "roc", "pro")}

    fig, ax = plt.subplots(figsize=(4.2, 3))
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[~labels], bins, color="tab:green", alpha=0.6, label=f"good ({(~labels).sum()})")
    ax.hist(scores[labels], bins, color="tab:red", alpha=0.6, label=f"defective ({labels.sum()})")
    ax.axvline(c["image_threshold"], color="k", ls="--", lw=1, label=f"threshold {c['image_threshold']:.4g}")
    ax.set(title=f"{category}: image scores", xlabel="image score (raw)", ylabel="images")
    ax.legend(fontsize=7)
    save_plot(fig, os.path.join(root, files["histogram"]))

    fig, ax = plt.subplots(figsize=(3.4, 3))
    ax.plot([0, 1], [0, 1], color="0.8", lw=1)
    if both_classes:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="tab:blue", label=f"AUROC {fmt(result.get('image_AUROC'))}")
        ax.plot(rep["FP"] / max(rep["FP"] + rep["TN"], 1), rep["recall"], "o", color="k", label="threshold")
        ax.legend(fontsize=7, loc="lower right")
    else:
        note(ax, "one class only: no ROC")
    save_rate_plot(fig, ax, os.path.join(root, files["roc"]), f"{category}: image ROC", "false positive rate",
                   "true positive rate")

    if result.get("no_masks"):
        files["pro"] = None
        return files
    fig, ax = plt.subplots(figsize=(3.4, 3))
    curve = a.get("pro_curve")
    if curve is not None:
        fpr, pro = thin_curve(*curve)
        ax.plot(fpr, pro, color="tab:purple", label=f"PRO {fmt(result.get('PRO'))} (FPR <= {PRO_FPR_LIMIT})")
        inside = fpr <= PRO_FPR_LIMIT
        ax.fill_between(fpr[inside], pro[inside], color="tab:purple", alpha=0.15)
        ax.axvline(PRO_FPR_LIMIT, color="0.5", ls=":", lw=1)
        ax.legend(fontsize=7, loc="lower right")
    else:
        note(ax, "no defect regions: no PRO")
    save_rate_plot(fig, ax, os.path.join(root, files["pro"]), f"{category}: per-region overlap",
                   "false positive rate (pixels)", "PRO")
    return files
