"""Evaluation metrics: image/pixel AUROC, PRO, F1-optimal thresholds.

AUROC is scikit-learn's. PRO is exact (one threshold per distinct score, not a grid) and
vectorised: one sort of all pixels, cumulative sums of per-pixel weights.
"""
import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

PRO_FPR_LIMIT = 0.3
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


REFERENCE_SWEEP_STEPS = 500


def auroc(labels, scores, non_partial=False):
    """Area under the ROC curve (scikit-learn). With `non_partial`, the OrthoAD reference code's
    computation instead: for image scores its bin-width rule on the full ROC (equal to the
    trapezoid there); for pixel maps ([N, H, W]) its 500-threshold sweep, which reads higher."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    if labels.all() or not labels.any():
        return None  # undefined with one class
    if not non_partial:
        return float(roc_auc_score(labels.ravel(), scores.ravel()))
    if scores.ndim == 3:
        return non_partial_auc(*reference_sweep_roc(labels, scores))
    fpr, tpr, _ = roc_curve(labels.ravel(), scores.ravel())
    return non_partial_auc(fpr, tpr)


def reference_sweep_roc(masks, maps, steps=REFERENCE_SWEEP_STEPS):
    """The reference's ROC: `steps` thresholds at evenly spaced ranks of the pixels of the map
    with the highest maximum (highest first), a pixel positive when score > threshold. The curve
    has no (0,0)/(1,1) end points, and the bin rule stretches its ends to 0 and 1 -- hence the
    higher reading. Vectorised with sorted scores instead of one pass per threshold."""
    worst = np.sort(maps.reshape(len(maps), -1)[maps.reshape(len(maps), -1).max(1).argmax()])
    thresholds = worst[np.linspace(0, worst.size - 1, num=steps).astype(int)][::-1]
    pos = np.sort(maps[masks].ravel())
    neg = np.sort(maps[~masks].ravel())
    tpr = (len(pos) - np.searchsorted(pos, thresholds, side="right")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, thresholds, side="right")) / len(neg)
    return fpr, tpr


def non_partial_auc(fpr, tpr):
    """The OrthoAD reference's area: sum_i tpr_i * (half the gap to each neighbour), with the
    first bin starting at 0 and the last ending at 1."""
    fpr = np.asarray(fpr, np.float64)
    tpr = np.asarray(tpr, np.float64)
    right = np.append(fpr[1:], 1.0)
    left_half = np.diff(fpr, prepend=fpr[0]) / 2
    right_half = (right - fpr) / 2
    width = left_half + right_half
    width[0] = fpr[0] + right_half[0]
    width[-1] = left_half[-1] + 1.0 - fpr[-1] if len(fpr) > 1 else 1.0
    return float(np.sum(width * tpr))


def label_regions(masks):
    """Connected components (8-connected) of every mask -> global region ids (0 = none), count."""
    regions = np.zeros(masks.shape, np.int64)
    count = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=EIGHT_CONNECTED)
        regions[i] = np.where(lab > 0, lab + count, 0)
        count += n
    return regions, count


def pro_curve(masks, maps):
    """Exact per-region-overlap curve over the whole test set.

    Returns (fpr, pro, thresholds) with one point per distinct score, highest threshold first,
    starting at (0, 0). FPR counts all normal pixels of all images; PRO is the mean over all
    ground-truth regions of the fraction of the region at or above the threshold.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions, n_regions = label_regions(masks)
    if n_regions == 0 or masks.all():
        return None
    regions = regions.ravel()
    scores = maps.ravel()
    sizes = np.bincount(regions)
    weight_pro = np.where(regions > 0, 1.0 / (sizes[regions] * n_regions), 0.0)
    weight_fp = (regions == 0) / float((regions == 0).sum())
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    fpr = np.cumsum(weight_fp[order])[last_of_tie]
    pro = np.cumsum(weight_pro[order])[last_of_tie]
    return np.r_[0.0, fpr], np.r_[0.0, pro], np.r_[np.inf, sorted_scores[last_of_tie]]


def pro_auc(masks, maps, fpr_limit=PRO_FPR_LIMIT, non_partial=False):
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (trapezoid rule;
    the curve is cut at fpr_limit by linear interpolation)."""
    curve = pro_curve(masks, maps)
    if curve is None:
        return None
    fpr, pro, _ = curve
    return area_up_to(fpr, pro, fpr_limit, non_partial)


def area_up_to(fpr, pro, fpr_limit, non_partial=False):
    keep = fpr <= fpr_limit
    f, p = fpr[keep], pro[keep]
    if f[-1] < fpr_limit and keep.sum() < len(fpr):
        j = keep.sum()
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        f = np.r_[f, fpr_limit]
        p = np.r_[p, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    if non_partial:
        return non_partial_auc(f / fpr_limit, p)
    return float(auc(f, p) / fpr_limit)


def f1_optimal_threshold(labels, scores):
    """Threshold maximising F1 (predicted anomalous when score >= threshold)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros_like(precision), where=(precision + recall) > 0)
    best = int(np.argmax(f1[:-1]))
    return float(thresholds[best])


def classification_report(labels, scores, threshold):
    """Counts and precision/recall/F1 at `threshold` (score >= threshold is anomalous)."""
    labels = np.asarray(labels).ravel().astype(bool)
    pred = np.asarray(scores).ravel() >= threshold
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))
    tn = int(np.sum(~pred & ~labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "TP": tp, "FP": fp, "FN": fn, "TN": tn}
