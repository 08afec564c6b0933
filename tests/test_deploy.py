"""export_model.py -> infer.py round trip on real bottle images, parity with predict.py."""
import json
import os

import numpy as np
import pytest

from pipeline import cli, evaluation
import export_model
import infer
import predict
import train
from conftest import R18, assert_batches_match_batch_1, make_synthetic_category
from datasets.transforms import list_input_images, load_and_preprocess
from datasets.unreadable import SOME_UNREADABLE
from utils import UserError


@pytest.fixture(scope="module")
def exported(bottle_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inference") / "bottle")
    assert export_model.main([*R18, "--model_path", os.path.join(bottle_run, "bottle.pdparams"),
                              "--save_dir", out, "--onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def test_images(mvtec_lite):
    return [os.path.join(mvtec_lite, "bottle", "test", d) for d in ("broken_small", "good")]


def read_jsonl(path):
    with open(path) as f:
        return {os.path.abspath(r["image_path"]): r for r in map(json.loads, f)}


def run_infer(exported, images, out, *extra):
    assert infer.main(["--model_dir", exported, "--input_file", *images, "--cpu_threads", "2",
                       "--save_path", out, *extra]) == 0
    return read_jsonl(os.path.join(out, "infer_results.jsonl"))


@pytest.fixture(scope="module")
def eager_predictions(bottle_run, test_images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("predict_eager"))
    assert predict.main([*test_images, "--category", "bottle", *R18, "--model_path", bottle_run,
                         "--engine", "eager", "--output_dir", out, "--no_progress"]) == 0
    return out


def assert_maps_agree(records, test_images, pred_dir, atol):
    """Calibrated maps written by infer.py equal those written by predict.py, for every test image."""
    assert len(records) == len(list_input_images(test_images)) > 0
    for rec in records.values():
        want = np.load(os.path.join(pred_dir, os.path.basename(rec["anomaly_map"])))
        np.testing.assert_allclose(np.load(rec["anomaly_map"]), want, atol=atol, rtol=0)


def eager_scores(bottle_run, test_images):
    """Raw image scores from predict's eager path, keyed by image."""
    args = cli.parse(cli.parser_with(cli.add_model_args, cli.add_runtime_args),
                        [*R18, "--model_path", bottle_run, "--engine", "eager"])
    _, detector, _ = evaluation.load_detector(args, "bottle")
    out = {}
    for p in list_input_images(test_images):
        chw, _ = load_and_preprocess(p, 256, 224)
        out[os.path.abspath(p)] = float(detector.raw(chw[None])[0][0])
    return out


def test_infer_matches_eager_predict(exported, bottle_run, test_images, eager_predictions, tmp_path):
    records = run_infer(exported, test_images, str(tmp_path / "paddle"), "--enable_mkldnn", "True",
                        "--enable_benchmark", "True")
    scores = eager_scores(bottle_run, test_images)
    for path, rec in records.items():
        assert rec["raw_score"] == pytest.approx(scores[path], rel=1e-4)
    assert_maps_agree(records, test_images, eager_predictions, 1e-3)
    labels = {p: r["pred_label"] for p, r in records.items()}
    broken = len(os.listdir(test_images[0]))  # 22 broken_small (and 20 good) shared, 5 (and 5) demo
    assert sum(v == "anomalous" for v in labels.values()) >= round(0.9 * broken)


def test_onnxruntime_matches_eager_predict(exported, bottle_run, test_images, eager_predictions, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    records = run_infer(exported, test_images, str(tmp_path / "onnx"), "--backend", "onnxruntime")
    scores = eager_scores(bottle_run, test_images)
    for path, rec in records.items():
        assert rec["raw_score"] == pytest.approx(scores[path], rel=1e-3)
    assert_maps_agree(records, test_images, eager_predictions, 1e-3)


def test_batches_and_reproduction_flags_give_the_same_scores(exported, test_images, tmp_path):
    a = run_infer(exported, test_images[:1], str(tmp_path / "b1"))
    b = run_infer(exported, test_images[:1], str(tmp_path / "b4"), "--batch_size", "4",
                  "--enable_mkldnn", "False", "--cpu_threads", "1")
    for path in a:
        assert b[path]["raw_score"] == pytest.approx(a[path]["raw_score"], rel=1e-4)


def test_batch_scores_equal_batch_1(exported, test_images, tmp_path):
    images = [os.path.join(d, f"{i:03d}.png") for d in test_images for i in range(3)]
    assert_batches_match_batch_1(exported, images, tmp_path)


def test_reproduction_style_flags(exported, test_images, tmp_path):
    assert infer.main(["--model_file", os.path.join(exported, "model.json"),
                       "--params_file", os.path.join(exported, "model.pdiparams"),
                       "--stats", os.path.join(exported, "stats.npz"),
                       "--input_file", os.path.join(test_images[1], "000.png"), "--save_path", str(tmp_path)]) == 0
    assert os.path.isfile(tmp_path / "000_anomaly_map.npy")


def test_benchmark_report_fields(exported, test_images, tmp_path, capsys):
    log = str(tmp_path / "bench.log")
    run_infer(exported, [os.path.join(test_images[1], f"{i:03d}.png") for i in range(4)], str(tmp_path / "o"),
              "--enable_benchmark", "True", "--save_log_path", log)
    assert "inference_time(ms)" in capsys.readouterr().out
    report = json.loads(open(log).read().splitlines()[-1])
    for key in ("preprocess_time_ms", "inference_time_ms", "postprocess_time_ms", "cpu_rss_mb", "batch_size",
                "cpu_math_library_num_threads", "data_num"):
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert report["runtime_device"] == "cpu" and report["enable_mkldnn"] is True
    assert report["input_shape"] == [3, 224, 224] and report["model_name"] == "ortho_resnet18"


def test_bad_deployment_inputs(exported, bottle_run, test_images, tmp_path, r18_weights):
    img = os.path.join(test_images[1], "000.png")
    with pytest.raises(UserError, match="model dir not found"):
        infer.main(["--model_dir", str(tmp_path / "nope"), "--input_file", img])
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in ("model.json", "model.pdiparams"):
        os.link(os.path.join(exported, f), partial / f)
    with pytest.raises(UserError, match="stats file not found"):
        infer.main(["--model_dir", str(partial), "--input_file", img, "--save_path", str(tmp_path / "o1")])
    # Stats of another model (k=8 on synthetic data) beside the bottle graph.
    data = str(tmp_path / "data")
    make_synthetic_category(data, "widget")
    other = str(tmp_path / "other")
    assert train.main(["--data_path", data, "--category", "widget", "--k", "8", "--resize", "64", "--crop_size",
                       "64", "--backbone_weights", r18_weights, "--save_path", other, "--no_progress"]) == 0
    export_model.main(["--k", "8", "--model_path", os.path.join(other, "widget.pdparams"), "--save_dir", other + "_inf"])
    os.link(os.path.join(other + "_inf", "stats.npz"), partial / "stats.npz")
    with pytest.raises(UserError, match="does not run on the input shape"):
        infer.main(["--model_dir", str(partial), "--input_file", img, "--save_path", str(tmp_path / "o2")])
    # Same input shape, other k: the graph runs, the statistics do not fit its output.
    assert train.main(["--data_path", data, "--category", "widget", "--k", "8", "--backbone_weights", r18_weights,
                       "--save_path", other + "224", "--no_progress"]) == 0
    export_model.main(["--k", "8", "--model_path", os.path.join(other + "224", "widget.pdparams"),
                       "--save_dir", other + "224_inf"])
    os.replace(os.path.join(other + "224_inf", "stats.npz"), partial / "stats.npz")
    with pytest.raises(UserError, match="do not fit the model"):
        infer.main(["--model_dir", str(partial), "--input_file", img, "--save_path", str(tmp_path / "o2")])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n nothing")
    # Named on stderr and skipped, the others scored (tests/test_hardening.py): exit code 3.
    assert infer.main(["--model_dir", exported, "--input_file", str(corrupt), "--save_path",
                       str(tmp_path / "o3")]) == SOME_UNREADABLE
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        infer.main(["--model_dir", exported, "--input_file", str(empty), "--save_path", str(tmp_path / "o4")])
    with pytest.raises(UserError, match="trained with k=100"):
        export_model.main(["--k", "50", "--model_path", os.path.join(bottle_run, "bottle.pdparams"),
                           "--save_dir", str(tmp_path / "o5")])
    with pytest.raises(UserError, match="model file not found"):
        export_model.main(["--model_path", str(tmp_path / "missing.pdparams"), "--save_dir", str(tmp_path / "o6")])
