import os
import subprocess
import sys

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


OPENMP_BLOCKTIME_PROBE = """
import ctypes, os, sys
sys.path.insert(0, os.getcwd())
import {module}
import paddle
paddle.nn.Conv2D(3, 4, 3)(paddle.ones([1, 3, 8, 8]))  # starts OpenMP
iomp = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so"))
print(iomp.kmp_get_blocktime())
"""


ENTRY_POINTS = ["train", "eval", "predict", "export_model", "infer"]


def openmp_blocktime_after_import(modules, user_value=None):
    """KMP_BLOCKTIME in Paddle's OpenMP runtime after a forward, in a fresh process that imported
    `modules` first (None: the variable unset)."""
    if not os.path.exists(os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so")):
        pytest.skip("this Paddle build does not use Intel OpenMP")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "KMP_BLOCKTIME"}
    if user_value:
        env["KMP_BLOCKTIME"] = user_value
    out = subprocess.run([sys.executable, "-c", OPENMP_BLOCKTIME_PROBE.format(module=", ".join(modules))], cwd=root,
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_stop_openmp_spinning_after_a_forward(module):
    """Every entry point must bring KMP_BLOCKTIME=1 into Paddle's OpenMP runtime (Intel's 200 ms
    default spin took a core from the scoring after each forward)..."""
    assert openmp_blocktime_after_import([module]) == "1"


def test_entry_points_keep_the_users_openmp_blocktime():
    """...unless the user set it: one process importing every entry point (any one of them
    overriding the user's value would show)."""
    assert openmp_blocktime_after_import(ENTRY_POINTS, user_value="7") == "7"


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
