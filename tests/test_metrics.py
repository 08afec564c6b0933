import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score, roc_curve

from report import metrics


def slow_pro_curve(masks, maps):
    """Obvious PRO: every distinct score as a threshold, regions labelled per image."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([pred[i][r].sum() / r.sum() for i, r in regions]))
    return np.array(fprs), np.array(pros)


def slow_pro_auc(masks, maps, limit=0.3):
    fpr, pro = slow_pro_curve(masks, maps)
    j = np.searchsorted(fpr, limit, side="right")
    f, p = list(fpr[:j]), list(pro[:j])
    if f[-1] < limit and j < len(fpr):
        f.append(limit)
        p.append(np.interp(limit, fpr[j - 1:j + 1], pro[j - 1:j + 1]))
    return auc(f, p) / limit


def random_case(seed, n=4, size=12, levels=None):
    rng = np.random.RandomState(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n - 1):  # last image normal
        for _ in range(rng.randint(1, 3)):
            y, x = rng.randint(0, size - 3, 2)
            masks[i, y:y + rng.randint(1, 4), x:x + rng.randint(1, 4)] = 1
    maps = rng.rand(n, size, size) + masks * rng.rand() * 1.5
    if levels:  # many ties
        maps = np.round(maps * levels) / levels
    return masks, maps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7])
def test_pro_matches_slow_reference(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    fpr, pro, _ = metrics.pro_curve(masks, maps)
    sf, sp = slow_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, sf, atol=1e-12)
    np.testing.assert_allclose(pro, sp, atol=1e-12)
    assert metrics.pro_auc(masks, maps) == pytest.approx(slow_pro_auc(masks, maps), abs=1e-12)


def test_pro_perfect_and_regions_are_8_connected():
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 2, 2] = masks[0, 3, 3] = 1  # diagonal neighbours: one region
    _, n = metrics.label_regions(masks)
    assert n == 1
    assert metrics.pro_auc(masks, masks.astype(float)) == pytest.approx(1.0)
    assert metrics.pro_curve(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) is None


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_sklearn(seed):
    rng = np.random.RandomState(seed)
    labels = rng.rand(500) < 0.3
    scores = rng.rand(500) + labels * 0.4
    scores[:50] = np.round(scores[:50], 1)  # ties
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)
    masks, maps = random_case(seed, n=6, size=20)
    assert metrics.auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-15)
    assert metrics.auroc(np.zeros(5), rng.rand(5)) is None


def reference_non_partial_auc(fpr, pro, at_fpr=1.0):
    """Loop as in the OrthoAD reference code (bin widths around each point)."""
    acut = 0.0
    for i in range(len(fpr)):
        fpr_right = fpr[i + 1] if i != len(fpr) - 1 else 1.0
        b_left = (fpr[i] - fpr[i - 1]) / 2
        b_right = (fpr_right - fpr[i]) / 2
        if i == 0:
            b = fpr[i] + b_right
        elif i == len(fpr) - 1:
            b = b_left + 1.0 - fpr[i]
        else:
            b = b_left + b_right
        acut += b * pro[i]
    return acut / at_fpr


def reference_sweep(masks, maps, steps=500):
    """Loop as in the reference: thresholds from the worst map's sorted pixels, one pass each."""
    worst = maps[maps.reshape(len(maps), -1).max(1).argmax()].flatten()
    worst.sort()
    fprs, tprs = [], []
    for th in worst[np.linspace(0, worst.size - 1, num=steps).astype(int)][::-1]:
        binary = maps > th
        tprs.append(np.logical_and(masks, binary).sum() / masks.sum())
        fprs.append(np.logical_and(1 - masks, binary).sum() / (1 - masks).sum())
    return np.array(fprs), np.array(tprs)


def test_non_partial_auc_matches_reference_loops():
    rng = np.random.RandomState(3)
    labels = rng.rand(400) < 0.4
    scores = rng.rand(400) + labels * 0.5
    fpr, tpr, _ = roc_curve(labels, scores)
    assert metrics.non_partial_auc(fpr, tpr) == pytest.approx(reference_non_partial_auc(fpr, tpr), abs=1e-12)
    masks, maps = random_case(5, n=6, size=24)
    sweep = reference_sweep(masks, maps, steps=50)
    np.testing.assert_allclose(metrics.reference_sweep_roc(masks.astype(bool), maps, steps=50), sweep)
    got = metrics.auroc(masks, maps, non_partial=True)
    assert got == pytest.approx(reference_non_partial_auc(*reference_sweep(masks, maps)))


def test_f1_threshold_is_the_best_over_all_cuts():
    rng = np.random.RandomState(1)
    labels = rng.rand(200) < 0.5
    scores = rng.rand(200) + labels * 0.3
    t = metrics.f1_optimal_threshold(labels, scores)
    best = max(metrics.classification_report(labels, scores, c)["f1"] for c in np.unique(scores))
    assert metrics.classification_report(labels, scores, t)["f1"] == pytest.approx(best)
    rep = metrics.classification_report(labels, scores, t)
    assert rep["TP"] + rep["FP"] + rep["FN"] + rep["TN"] == 200


def test_pro_is_fast_on_a_category_sized_set():
    """Not a timing assertion: exercises the vectorised path at full size (100 x 224^2)."""
    masks, maps = random_case(0, n=100, size=224)
    value = metrics.pro_auc(masks, maps)
    assert 0.0 <= value <= 1.0
