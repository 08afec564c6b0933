import numpy as np
import paddle
import pytest

from models.backbone import ResNetFeatures, concat_to_first, make_engine, read_backbone_weights
from models.padim import PaDiMFeatureNet, make_projection
from utils import UserError


class Embedding(paddle.nn.Layer):
    def __init__(self, weights):
        super().__init__()
        self.features = ResNetFeatures("resnet18").load_pretrained(weights)

    def forward(self, x):
        return concat_to_first(self.features(x))


def test_inference_with_onednn_runs_interpolate_graphs_like_eager(r18_weights):
    """Regression guard for Paddle issue #79749 (3.3.x: oneDNN fails on F.interpolate graphs):
    the pinned Paddle must build and run this graph and agree with eager mode."""
    net = Embedding(r18_weights)
    x = np.random.RandomState(0).randn(2, 3, 96, 96).astype(np.float32)
    fast = make_engine(net, (3, 96, 96), engine="inference", enable_mkldnn=True, cpu_threads=2)
    eager = make_engine(net, (3, 96, 96), engine="eager")
    a, b = fast(x)[0], eager(x)[0]
    assert a.shape == (2, 448, 24, 24)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_projection_is_inside_the_graph(r18_weights):
    kind, proj = make_projection("ortho", [64, 128, 256], 10, 0)
    net = PaDiMFeatureNet("resnet18", kind, proj)
    net.backbone.load_pretrained(r18_weights)
    full = Embedding(r18_weights)
    x = np.random.RandomState(1).randn(1, 3, 64, 64).astype(np.float32)
    got = make_engine(net, (3, 64, 64))(x)[0]
    want = np.einsum("bchw,ck->bkhw", make_engine(full, (3, 64, 64), engine="eager")(x)[0], proj)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_partial_weights_load_and_missing_layers_are_named(r18_weights, tmp_path):
    state = read_backbone_weights("resnet18", r18_weights, ["layer1", "layer2", "layer3"])
    assert not any(k.startswith(("layer4", "fc")) for k in state)
    with pytest.raises(UserError, match="layer4"):
        read_backbone_weights("resnet18", r18_weights, ["layer1", "layer2", "layer3", "layer4"])
    partial = {k: v for k, v in paddle.load(r18_weights).items() if not k.startswith("layer3")}
    path = str(tmp_path / "partial.pdparams")
    paddle.save(partial, path)
    with pytest.raises(UserError, match="lack layer3"):
        read_backbone_weights("resnet18", path, ["layer1", "layer2", "layer3"])
    with pytest.raises(UserError, match="resnet50"):
        read_backbone_weights("resnet50", r18_weights, ["layer1"])
    with pytest.raises(UserError, match="not found"):
        read_backbone_weights("resnet18", str(tmp_path / "nope.pdparams"), ["layer1"])
