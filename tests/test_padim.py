import numpy as np
import pytest

import models.gaussian as gaussian
from models.gaussian import EPSILON, GaussianAccumulator, mahalanobis, pack_precision, unpack_precision
from models.padim import PaDiMFeatureNet, make_projection
from utils import UserError


@pytest.mark.parametrize("block_bytes", [gaussian.BLOCK_BYTES, 1])  # one block; blocks of 16 positions
def test_streaming_stats_equal_numpy_cov(block_bytes, monkeypatch):
    monkeypatch.setattr(gaussian, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(gaussian, "POSITION_CHUNK", 16)
    rng = np.random.RandomState(0)
    feats = (rng.randn(23, 5, 6, 8) * 0.1 + 50.0).astype(np.float32)  # large mean: tests the shift
    acc = GaussianAccumulator()
    for lo in range(0, 23, 7):
        acc.update(feats[lo:lo + 7])
    assert len(acc.outer) == (1 if block_bytes > 1 else 3)
    mean, packed, scale = acc.finalize()
    precision = unpack_precision(packed, scale)
    x = feats.reshape(23, 5, 48).astype(np.float64)
    for p in (0, 7, 17, 47):
        np.testing.assert_allclose(mean[p], x[:, :, p].mean(0), rtol=1e-6)
        cov = np.cov(x[:, :, p], rowvar=False) + EPSILON * np.eye(5)
        ref = np.linalg.inv(cov)
        np.testing.assert_allclose(precision[p], ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())


def test_mahalanobis_matches_direct_formula():
    rng = np.random.RandomState(1)
    feats = rng.randn(3, 4, 2, 5).astype(np.float32)
    mean = rng.randn(10, 4).astype(np.float32)
    a = rng.randn(10, 4, 4)
    precision = (a @ a.transpose(0, 2, 1) + np.eye(4)).astype(np.float32)
    got = mahalanobis(feats, mean, *pack_precision(precision))
    for b in range(3):
        for p in range(10):
            d = feats[b, :, p // 5, p % 5] - mean[p]
            assert got[b, p // 5, p % 5] == pytest.approx(np.sqrt(d @ precision[p] @ d), rel=1e-4)


def test_packed_mahalanobis_on_fitted_statistics():
    """The packed 16-bit triangle against float64 on a real-sized fit: k=100, variances spread
    over four decades (harsher than real features: on bottle, R18 k=100, the largest error is
    1.2e-4 relative), and batch results independent of the batch they come in."""
    rng = np.random.RandomState(2)
    k, positions, n = 100, 12, 300
    spread = np.exp(rng.uniform(-6, 3, k))  # variances from 0.0025 to 20
    train = (rng.randn(n, k, 3, 4) * np.sqrt(spread)[None, :, None, None]
             @ np.eye(4) + rng.randn(1, k, 1, 1)).astype(np.float32)
    train = np.einsum("nkhw,kj->njhw", train, np.linalg.qr(rng.randn(k, k))[0]).astype(np.float32)
    acc = GaussianAccumulator()
    acc.update(train)
    mean, packed, scale = acc.finalize()
    flat = train.reshape(n, k, positions).astype(np.float64)
    precision = np.stack([np.linalg.inv(np.cov(flat[:, :, p], rowvar=False) + EPSILON * np.eye(k))
                          for p in range(positions)])
    assert packed.dtype == np.int16 and packed.shape == (positions, k * (k + 1) // 2)
    np.testing.assert_allclose(mean, flat.mean(0).T, rtol=1e-5, atol=1e-5)
    test = (train[:5] + rng.randn(5, k, 3, 4).astype(np.float32) * np.array([0, 0.5, 1, 3, 10], np.float32)[:, None, None, None])
    got = mahalanobis(test, mean, packed, scale)
    x = test.reshape(5, k, positions).transpose(2, 0, 1).astype(np.float64) - mean[:, None, :]
    exact = np.sqrt(np.einsum("pbi,pij,pbj->pb", x, precision, x)).T.reshape(5, 3, 4)
    np.testing.assert_allclose(got, exact, rtol=1e-3)
    one_by_one = np.concatenate([mahalanobis(test[i:i + 1], mean, packed, scale) for i in range(5)])
    np.testing.assert_array_equal(got, one_by_one)


def test_projection_before_upsampling_equals_concatenation_first():
    """The matrix projection runs per layer before the nearest upsampling; it must equal
    projecting the concatenated embedding."""
    import paddle
    import paddle.nn.functional as F

    from models.backbone import concat_to_first

    kind, w = make_projection("ortho", [64, 128, 256], 40, 0)
    net = PaDiMFeatureNet("resnet18", kind, w)
    net.eval()
    x = paddle.to_tensor(np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32))
    with paddle.no_grad():
        got = net(x).numpy()
        ref = F.conv2d(concat_to_first(net.backbone(x)), net.projection).numpy()
    assert got.shape == (2, 40, 16, 16)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_projections():
    chans = [64, 128, 256]
    kind, w = make_projection("ortho", chans, 100, 521)
    assert kind == "matrix" and w.shape == (448, 100)
    np.testing.assert_allclose(w.T @ w, np.eye(100), atol=1e-5)
    kind, idx = make_projection("h_sample", chans, 100, 521)
    assert kind == "index" and len(set(idx)) == 100
    per_layer = [np.sum((idx >= lo) & (idx < hi)) for lo, hi in [(0, 64), (64, 192), (192, 448)]]
    assert per_layer == [14, 29, 57]  # 100 * [64, 128, 256] / 448, largest remainders
    _, s1 = make_projection("sample", chans, 50, 7)
    _, s2 = make_projection("sample", chans, 50, 7)
    _, s3 = make_projection("sample", chans, 50, 8)
    assert (s1 == s2).all() and not (s1 == s3).all()
    rng = np.random.RandomState(0)
    x = rng.randn(1000, 6) @ np.diag([5, 4, 3, 0.1, 0.1, 0.1])
    _, v = make_projection("svd_ortho", [6], 3, 0, gram=x.T @ x)
    u = np.linalg.svd(x, full_matrices=False)[2][:3].T
    np.testing.assert_allclose(np.abs(v.T @ u), np.eye(3), atol=1e-6)
    with pytest.raises(UserError):
        make_projection("ortho", chans, 449, 0)


def test_blur_equals_scipy_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    from models.postprocess import anomaly_maps
    rng = np.random.RandomState(0)
    image = rng.rand(224, 224).astype(np.float32)
    # Same size in and out: the upsampling is the identity, what is left is the blur alone.
    np.testing.assert_allclose(anomaly_maps(image[None], 224, sigma=4.0)[0], gaussian_filter(image, 4.0), atol=1e-6)
    patch = rng.rand(2, 7, 7).astype(np.float32)
    maps = anomaly_maps(patch, 28, sigma=4.0)
    assert maps.shape == (2, 28, 28)
    import cv2
    up = cv2.resize(patch[1], (28, 28), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(maps[1], gaussian_filter(up, 4.0), atol=1e-6)
    # The deployed shape (56 -> 224) and upsampling alone (EfficientAD), as resize [+ filter].
    patch = rng.rand(2, 56, 56).astype(np.float32) * 10
    for sigma in (4.0, 0.0):
        for got, p in zip(anomaly_maps(patch, 224, sigma=sigma), patch):
            up = cv2.resize(p, (224, 224), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(got, gaussian_filter(up, sigma) if sigma else up, atol=1e-5)


def test_mahalanobis_rejects_statistics_of_another_shape():
    rng = np.random.RandomState(3)
    mean = rng.randn(10, 4).astype(np.float32)
    packed, scale = pack_precision(np.tile(np.eye(4, dtype=np.float32), (10, 1, 1)))
    for feats in (rng.randn(1, 5, 2, 5), rng.randn(1, 4, 3, 5)):
        with pytest.raises(ValueError, match="do not match"):
            mahalanobis(feats.astype(np.float32), mean, packed, scale)
