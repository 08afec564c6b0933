"""infer.py --backend openvino on the exported bottle model: parity with Paddle Inference at fp32,
batch 1 = batch 8, and the one-line refusals (no model.onnx, bf16 where the CPU lacks it, int8, GPU)."""
import json
import os

import numpy as np
import pytest

import infer
from datasets.transforms import Preprocess
from deploy.predictor import load_deployed, resolve_files
from test_deploy import exported  # noqa: F401 (the bottle model exported with --onnx, a fixture)
from utils import UserError

ov = pytest.importorskip("openvino", reason="openvino not installed")


@pytest.fixture(scope="module")
def images(mvtec_lite):
    """8 bottle test images, defective and good."""
    test = os.path.join(mvtec_lite, "bottle", "test")
    return [os.path.join(test, d, f"{i:03d}.png") for d in ("broken_large", "good") for i in range(4)]


def raw_outputs(exported, images, backend):
    detector, meta = load_deployed(*resolve_files(exported), backend=backend, cpu_threads=2)
    preprocess = Preprocess.from_config(meta["config"])
    x = np.stack([preprocess.load(p)[0] for p in images])
    return detector, x, detector.raw(x)


def test_openvino_fp32_matches_paddle_inference(exported, images):
    _, x, (paddle_scores, paddle_maps) = raw_outputs(exported, images, "paddle")
    detector, _, (ov_scores, ov_maps) = raw_outputs(exported, images, "openvino")
    np.testing.assert_allclose(ov_scores, paddle_scores, rtol=1e-4, atol=0)
    np.testing.assert_allclose(ov_maps, paddle_maps, rtol=1e-4, atol=1e-4 * float(np.abs(paddle_maps).max()))
    # The network alone, a whole batch of 8 in one call against image by image: same features.
    batched = detector.engine(x)[0]
    single = np.concatenate([detector.engine(x[i:i + 1])[0] for i in range(len(x))])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4 * float(np.abs(single).max()))


def test_infer_batch_8_equals_batch_1(exported, images, tmp_path):
    records = []
    for size in (1, 8):
        out = str(tmp_path / f"b{size}")
        assert infer.main(["--model_dir", exported, "--input_file", *images, "--backend", "openvino",
                           "--cpu_threads", "2", "--batch_size", str(size), "--save_path", out]) == 0
        with open(os.path.join(out, "infer_results.jsonl")) as f:
            records.append({r["image_path"]: r for r in map(json.loads, f)})
    single, batched = records
    assert sorted(single) == sorted(batched) and len(single) == len(images)
    for path, rec in single.items():
        assert batched[path]["raw_score"] == pytest.approx(rec["raw_score"], rel=1e-6)
        assert batched[path]["pred_label"] == rec["pred_label"]
        np.testing.assert_allclose(np.load(batched[path]["anomaly_map"]), np.load(rec["anomaly_map"]),
                                   rtol=1e-6, atol=1e-7)


def test_missing_onnx_is_one_line(exported, tmp_path, capsys):
    bare = tmp_path / "no_onnx"
    bare.mkdir()
    for name in os.listdir(exported):
        if name != "model.onnx":
            os.symlink(os.path.join(exported, name), bare / name)
    with pytest.raises(SystemExit) as exit_info:
        infer.run_cli(lambda: infer.main(["--model_dir", str(bare), "--input_file", str(bare),
                                          "--backend", "openvino", "--save_path", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ONNX model not found") and "--onnx" in err and len(err.splitlines()) == 1


def test_bf16_refused_where_not_native_int8_and_gpu_not_offered(exported):
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    files = resolve_files(exported)
    if native:
        detector, _ = load_deployed(*files, backend="openvino", cpu_threads=2, precision="bf16")
        assert detector.engine.precision == "bf16"
    else:
        with pytest.raises(UserError, match="bf16 refused: this CPU has neither AMX-BF16 nor AVX512-BF16"):
            load_deployed(*files, backend="openvino", cpu_threads=2, precision="bf16")
    with pytest.raises(UserError, match="the ONNX backends \\(onnxruntime, openvino\\) run fp32 exports"):
        load_deployed(*files, backend="openvino", cpu_threads=2, precision="int8")
    with pytest.raises(UserError, match="--backend openvino runs on the CPU here"):
        load_deployed(*files, backend="openvino", use_gpu=True)
