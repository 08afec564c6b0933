"""models/version.py: a model's version (hash of what decides its answers, date, image count,
parent) through save, --update, new thresholds, export, metrics files and the calibration's
validation figures."""
import json
import os
import shutil

import numpy as np
import pytest

import eval as eval_script
import export_model
import train
from conftest import make_synthetic_category
from deploy.predictor import exported_version, load_stats
from models import load_model, save_model
from models.version import version_id
from utils import UserError

TINY = ["--method", "ortho", "--arch", "resnet18", "--k", "8", "--resize", "64", "--crop_size", "64"]


@pytest.fixture(scope="module")
def fitted(r18_weights, tmp_path_factory):
    """A tiny synthetic category fitted with --keep_sums, and a second folder of new good images."""
    root = tmp_path_factory.mktemp("version")
    data, more = str(root / "data"), str(root / "more")
    make_synthetic_category(data, n_train=8)
    make_synthetic_category(more, n_train=3, seed=1)
    run = str(root / "run")
    assert train.main(["--data_path", data, "--category", "widget", *TINY, "--backbone_weights", r18_weights,
                       "--save_path", run, "--keep_sums", "--calib_ratio", "0.25", "--no_progress"]) == 0
    return root, data, more, run, r18_weights


def copy_run(fitted, name):
    root, _, _, run, _ = fitted
    out = str(root / name)
    shutil.copytree(run, out)
    return out, os.path.join(out, "widget.pdparams")


def test_a_fitted_model_has_a_version_kept_when_saved_again_unchanged(fitted, tmp_path):
    _, _, _, run, _ = fitted
    state = load_model(os.path.join(run, "widget.pdparams"))
    v = state["version"]
    assert len(v["id"]) == 12 and int(v["id"], 16) >= 0 and v["parent"] is None
    assert v["train_images"] == 6 and v["trained_at"].endswith("Z")  # 8 minus 2 held out for calibration
    assert v["id"] == version_id(state)  # what was loaded hashes to what was saved
    path = str(tmp_path / "again.pdparams")
    save_model(path, load_model(os.path.join(run, "widget.pdparams")))
    assert load_model(path)["version"] == v  # same id, same date: nothing changed
    with open(os.path.join(run, "metrics", "widget.json")) as f:
        record = json.load(f)
    assert record["model_version"] == v["id"] and record["version"] == v


def test_update_makes_a_new_version_whose_parent_is_the_old_one(fitted):
    _, _, more, _, weights = fitted
    run, path = copy_run(fitted, "updated")
    old = load_model(path)["version"]
    assert train.main(["--update", "--data_path", more, "--category", "widget", *TINY, "--backbone_weights",
                       weights, "--save_path", run, "--no_progress"]) == 0
    new = load_model(path)["version"]
    assert new["id"] != old["id"] and new["parent"] == old["id"] and new["train_images"] == 9
    with open(os.path.join(run, "metrics", "widget.json")) as f:
        assert json.load(f)["model_version"] == new["id"]


def test_a_model_saved_before_versions_gets_its_id_and_is_named_as_parent(fitted):
    import paddle
    _, _, more, _, weights = fitted
    run, path = copy_run(fitted, "unversioned")
    state = load_model(path)
    want = state.pop("version")["id"]
    paddle.save(state, path, protocol=4)  # as save_model wrote it before versions existed
    old = load_model(path)["version"]
    assert old == {"id": want, "trained_at": None, "train_images": 6, "parent": None}
    assert train.main(["--update", "--data_path", more, "--category", "widget", *TINY, "--backbone_weights",
                       weights, "--save_path", run, "--no_progress"]) == 0
    assert load_model(path)["version"]["parent"] == want


def test_new_thresholds_make_a_new_version(fitted):
    _, data, _, _, weights = fitted
    run, path = copy_run(fitted, "recalibrated")
    old = load_model(path)["version"]
    assert eval_script.main(["--data_path", data, "--category", "widget", *TINY, "--save_path", run,
                             "--no_progress"]) == 0
    state = load_model(path)
    assert state["version"]["id"] != old["id"] and state["version"]["parent"] == old["id"]
    # The share of anomalous answers on the images the thresholds were set on, for the service's drift view.
    cal = state["calibration"]
    val = cal["validation"]
    with open(os.path.join(run, "metrics", "widget.json")) as f:
        record = json.load(f)
    assert record["model_version"] == state["version"]["id"]
    scores = np.array([p["raw_score"] for p in record["predictions"]], np.float32)
    good = np.array([p["label"] == 0 for p in record["predictions"]])
    assert (val["images"], val["good_images"]) == (5, 2)  # the synthetic test set: 2 good, 3 defective
    assert val["anomalous_share"] == pytest.approx(np.mean(scores >= cal["image_threshold"]))
    assert val["good_anomalous_share"] == pytest.approx(np.mean(scores[good] >= cal["image_threshold"]))
    span = cal["image_max"] - cal["image_min"]
    assert val["good_score_median"] == pytest.approx(
        np.median(np.clip((scores[good] - cal["image_threshold"]) / span + 0.5, 0, 1)), abs=1e-6)
    # Only the thresholds changed: the id depends on them alone, not on dates or paths.
    state["calibration"] = dict(state["calibration"], image_threshold=state["calibration"]["image_threshold"] + 1)
    assert version_id(state) != state["version"]["id"]


def test_held_out_calibration_stores_its_validation_share(fitted):
    _, _, _, run, _ = fitted
    cal = load_model(os.path.join(run, "widget.pdparams"))["calibration"]
    # Threshold = the largest held-out score: that one image sits on it (>= is anomalous), the other below.
    assert cal["validation"] == {"images": 2, "anomalous_share": 0.5, "good_images": 2, "good_anomalous_share": 0.5,
                                 "good_score_median": pytest.approx(cal["validation"]["good_score_median"])}


def test_export_carries_the_version_and_replaces_its_folder_whole(fitted, tmp_path):
    _, _, _, run, _ = fitted
    path = os.path.join(run, "widget.pdparams")
    out = str(tmp_path / "inference" / "widget")
    assert export_model.main([*TINY, "--model_path", path, "--save_dir", out]) == 0
    meta, _ = load_stats(os.path.join(out, "stats.npz"))
    state = load_model(path)
    assert meta["version"] == state["version"] and exported_version(meta) == state["version"]["id"]
    assert meta["calibration"]["validation"] == state["calibration"]["validation"]
    inode = os.stat(out).st_ino
    with open(os.path.join(out, "model.onnx"), "w") as f:
        f.write("stale")  # a file of an earlier export (with --onnx): gone with the rest
    assert export_model.main([*TINY, "--model_path", path, "--save_dir", out]) == 0
    assert os.stat(out).st_ino != inode and "model.onnx" not in os.listdir(out)
    assert os.listdir(tmp_path / "inference") == ["widget"]  # no temporary or old folder left beside it
    np.testing.assert_array_equal(load_stats(os.path.join(out, "stats.npz"))[1]["mean"], state["stats"]["mean"])


def test_export_replaces_its_folder_where_folders_cannot_be_swapped_in_one_step(fitted, tmp_path, monkeypatch):
    import utils
    _, _, _, run, _ = fitted
    out = str(tmp_path / "inference" / "widget")
    assert export_model.main([*TINY, "--model_path", os.path.join(run, "widget.pdparams"), "--save_dir", out]) == 0
    inode = os.stat(out).st_ino
    monkeypatch.setattr(utils, "_exchange_paths", lambda a, b: False)  # old aside, new in, old removed
    assert export_model.main([*TINY, "--model_path", os.path.join(run, "widget.pdparams"), "--save_dir", out]) == 0
    assert os.stat(out).st_ino != inode and os.listdir(tmp_path / "inference") == ["widget"]
    assert sorted(os.listdir(out)) == ["model.json", "model.pdiparams", "stats.npz"]


def test_export_refuses_a_folder_holding_other_files(fitted, tmp_path, capsys):
    _, _, _, run, _ = fitted
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files than an export .notes.txt."):
        export_model.main([*TINY, "--model_path", os.path.join(run, "widget.pdparams"), "--save_dir", str(out)])
    assert os.listdir(out) == ["notes.txt"] and os.listdir(tmp_path) == ["mine"]
