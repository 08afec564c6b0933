"""End-to-end runs of train.py / eval.py / predict.py as a user runs them."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval as eval_script
import predict as predict_script
import train as train_script
from conftest import ACCURACY, R18, ROOT, count_images, make_synthetic_category
from models import load_model



def read_results(path):
    with open(os.path.join(path, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_bottle_accuracy(bottle_run, mvtec_lite):
    header = open(os.path.join(bottle_run, "results.csv")).readline().strip()
    assert header == "category,image_AUROC,pixel_AUROC,PRO"
    row = read_results(bottle_run)[0]
    assert row["category"] == "bottle"
    image_bound, pixel_bound, pro_bound = ACCURACY["ortho"]
    assert float(row["image_AUROC"]) >= image_bound
    assert float(row["pixel_AUROC"]) >= pixel_bound
    assert float(row["PRO"]) >= pro_bound
    state = load_model(os.path.join(bottle_run, "bottle.pdparams"))
    assert state["stats"]["mean"].shape == (3136, 100)
    assert state["stats"]["precision_packed"].shape == (3136, 5050)  # upper triangle of 100 x 100
    assert state["stats"]["precision_packed"].dtype == np.int16
    assert state["config"]["method"] == "ortho" and "F1-optimal" in state["calibration"]["source"]
    record = json.load(open(os.path.join(bottle_run, "metrics", "bottle.json")))
    assert record["image_report"]["TP"] + record["image_report"]["FN"] == count_images(
        os.path.join(mvtec_lite, "bottle", "test"), exclude="good")


def test_eval_reproduces_training_metrics_and_saves_pictures(bottle_run, mvtec_lite, tmp_path):
    out = str(tmp_path / "eval")
    code = eval_script.main(["--data_path", mvtec_lite, "--category", "bottle", *R18, "--model_path", bottle_run,
                             "--save_path", out, "--save_pic", "True", "--no_progress", "--update_thresholds", "False"])
    assert code == 0
    assert read_results(out) == read_results(bottle_run)[:1] or \
        read_results(out)[0]["image_AUROC"] == read_results(bottle_run)[0]["image_AUROC"]
    pics = os.listdir(os.path.join(out, "pictures", "bottle"))
    assert len(pics) == count_images(os.path.join(mvtec_lite, "bottle", "test")) and all(p.endswith(".png") for p in pics)


def test_predict_is_calibrated_and_never_overwrites(bottle_run, mvtec_lite, tmp_path, capsys):
    images = [os.path.join(mvtec_lite, "bottle", "test", "broken_large", "000.png"),
              os.path.join(mvtec_lite, "bottle", "test", "good", "000.png")]
    out = str(tmp_path / "pred")
    args = [*images, "--category", "bottle", *R18, "--model_path", bottle_run, "--output_dir", out,
            "--save_pic", "True", "--no_progress"]
    assert predict_script.main(args) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [l["pred_label"] for l in lines] == ["anomalous", "normal"]
    state = load_model(os.path.join(bottle_run, "bottle.pdparams"))
    thr = state["calibration"]["image_threshold"]
    for rec in lines:
        assert (rec["pred_score"] >= 0.5) == (rec["raw_score"] >= thr)
        amap = np.load(rec["anomaly_map"])
        assert amap.shape == (224, 224) and 0 <= amap.min() and amap.max() <= 1
        mask = np.asarray(Image.open(rec["pred_mask"])) > 0
        assert np.mean(mask == (amap >= 0.5)) > 0.999  # the pixel threshold sits at 0.5 of the map
        assert os.path.isfile(rec["pred_mask"]) and os.path.isfile(rec["overlay"])
    from utils import UserError
    with pytest.raises(UserError, match="already exists"):
        predict_script.main(args)
    assert predict_script.main(args + ["--overwrite"]) == 0


def test_same_seed_same_model_and_metrics(synthetic_root, r18_weights, tmp_path):
    runs = []
    for name in ("a", "b"):
        save = str(tmp_path / name)
        assert train_script.main(["--data_path", synthetic_root, "--category", "widget", "--method", "sample",
                                  "--k", "20", "--resize", "64", "--crop_size", "64", "--backbone_weights",
                                  r18_weights, "--eval", "--save_path", save, "--no_progress", "--seed", "3"]) == 0
        runs.append(save)
    a, b = (load_model(os.path.join(r, "widget.pdparams")) for r in runs)
    np.testing.assert_array_equal(a["projection"], b["projection"])
    np.testing.assert_array_equal(a["stats"]["mean"], b["stats"]["mean"])
    np.testing.assert_array_equal(a["stats"]["precision_packed"], b["stats"]["precision_packed"])
    np.testing.assert_array_equal(a["stats"]["precision_scale"], b["stats"]["precision_scale"])
    assert open(os.path.join(runs[0], "results.csv")).read() == open(os.path.join(runs[1], "results.csv")).read()


@pytest.mark.parametrize("method", ["h_sample", "svd_ortho", "gaussian"])
def test_every_projection_trains(method, synthetic_root, r18_weights, tmp_path):
    save = str(tmp_path / method)
    assert train_script.main(["--data_path", synthetic_root, "--category", "widget", "--method", method,
                              "--k", "16", "--resize", "64", "--crop_size", "64", "--backbone_weights",
                              r18_weights, "--eval", "--save_path", save, "--no_progress"]) == 0
    row = read_results(save)[0]
    assert float(row["image_AUROC"]) >= 0.0 and row["PRO"] == ""


def test_training_without_labels_calibrates_on_held_out_normals(synthetic_root, r18_weights, tmp_path):
    save = str(tmp_path / "calib")
    assert train_script.main(["--data_path", synthetic_root, "--category", "widget", "--k", "16", "--resize", "64",
                              "--crop_size", "64", "--backbone_weights", r18_weights, "--save_path", save,
                              "--no_progress"]) == 0
    state = load_model(os.path.join(save, "widget.pdparams"))
    assert state["train_images"] == 5 and "held-out" in state["calibration"]["source"]
    assert not os.path.exists(os.path.join(save, "results.csv"))


# ---------------------------------------------------------------- bad input, as a user meets it
def run_cli(script, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def run_here(capsys, script, *args):
    """What run_cli sees, in this process (no interpreter start-up): the script's main under
    utils.run_cli, as its `__main__` runs it; an unexpected exception (a user's traceback) fails
    the test here."""
    import importlib

    from utils import run_cli as script_entry
    module = importlib.import_module(script[:-len(".py")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        script_entry(lambda: module.main([str(a) for a in args]))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert lines, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def train_args(data, save, weights, *extra):
    return ["--data_path", data, "--k", "8", "--resize", "64", "--crop_size", "64", "--backbone_weights", weights,
            "--save_path", save, "--no_progress", *extra]


def test_bad_inputs_fail_with_one_clear_line(tmp_path, r18_weights, capsys):
    root = str(tmp_path / "data")
    make_synthetic_category(root, "widget")
    save = str(tmp_path / "out")

    # as a user meets it: a process; the other cases in this process (run_here)
    code, _, err = run_cli("train.py", *train_args(str(tmp_path / "missing"), save, r18_weights))
    assert_one_line_error(code, err, "data path not found")

    code, _, err = run_here(capsys, "train.py", *train_args(root, save, r18_weights, "--category", "gadget"))
    assert_one_line_error(code, err, "category not found: gadget", "widget")

    code, _, err = run_here(capsys, "train.py",
                            *train_args(root, save, str(tmp_path / "none.pdparams"), "--category", "widget"))
    assert_one_line_error(code, err, "backbone weights not found")

    wrong = tmp_path / "wrong.pdparams"
    wrong.write_text("not weights")
    code, _, err = run_here(capsys, "train.py", *train_args(root, save, str(wrong), "--category", "widget"))
    assert_one_line_error(code, err, "cannot read backbone weights")
    assert not os.path.exists(save), "nothing may be written on failure"

    empty = os.path.join(root, "empty")
    os.makedirs(os.path.join(empty, "train", "good"))
    code, _, err = run_here(capsys, "train.py", *train_args(root, save, r18_weights, "--category", "empty"))
    assert_one_line_error(code, err, "no training images")


def test_bad_data_files_are_named(tmp_path, r18_weights, capsys):
    root = str(tmp_path / "data")
    cat = make_synthetic_category(root, "widget")
    save = str(tmp_path / "out")
    corrupt = os.path.join(cat, "train", "good", "002.png")
    open(corrupt, "wb").write(b"\x89PNG garbage")
    # as a user meets it: a process; the other cases in this process (run_here)
    code, _, err = run_cli("train.py", *train_args(root, save, r18_weights, "--category", "widget"))
    assert_one_line_error(code, err, "002.png")
    assert not os.path.exists(os.path.join(save, "widget.pdparams"))

    shutil.rmtree(root)
    cat = make_synthetic_category(root, "widget")
    os.remove(os.path.join(cat, "ground_truth", "scratch", "001_mask.png"))
    code, _, err = run_here(capsys, "train.py",
                            *train_args(root, save, r18_weights, "--category", "widget", "--eval"))
    assert_one_line_error(code, err, "missing ground-truth mask", "001")

    shutil.rmtree(root)
    cat = make_synthetic_category(root, "widget")
    Image.new("L", (32, 32)).save(os.path.join(cat, "ground_truth", "scratch", "000_mask.png"))
    code, _, err = run_here(capsys, "train.py",
                            *train_args(root, save, r18_weights, "--category", "widget", "--eval"))
    assert_one_line_error(code, err, "000_mask.png", "32x32")
    assert not os.path.exists(os.path.join(save, "widget.pdparams"))


def test_all_keeps_finished_categories_when_one_fails(tmp_path, r18_weights):
    root = str(tmp_path / "data")
    make_synthetic_category(root, "alpha", seed=1)
    broken = make_synthetic_category(root, "beta", seed=2)
    make_synthetic_category(root, "gamma", seed=3)
    open(os.path.join(broken, "test", "good", "000.png"), "wb").write(b"broken")
    save = str(tmp_path / "out")
    code, out, err = run_cli("train.py", *train_args(root, save, r18_weights, "--category", "all", "--eval"))
    assert code != 0 and "Traceback" not in err
    assert "beta" in err and "000.png" in err
    assert sorted(f for f in os.listdir(save) if f.endswith(".pdparams")) == ["alpha.pdparams", "gamma.pdparams"]
    assert [r["category"] for r in read_results(save)] == ["alpha", "gamma", "mean"]
    assert not [f for f in os.listdir(save) if f.endswith(".tmp") or f.startswith(".")]


def test_categories_resolve(tmp_path):
    from datasets import resolve_categories
    from utils import UserError
    root = str(tmp_path)
    for name in ("carpet", "bottle", "my_part"):
        os.makedirs(os.path.join(root, name, "train", "good"))
    assert resolve_categories(root, "all") == ["bottle", "carpet", "my_part"]
    assert resolve_categories(root, "textures") == ["carpet"]
    assert resolve_categories(root, "objects") == ["bottle"]
    assert resolve_categories(root, "my_part, bottle") == ["my_part", "bottle"]
    with pytest.raises(UserError, match="categories found: bottle, carpet, my_part"):
        resolve_categories(root, "screw")


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    from datasets.transforms import load_and_preprocess
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((80, 100), 128, np.uint8)).save(gray)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((80, 100, 4), 200, np.uint8)).save(rgba)
    for path in (gray, rgba):
        chw, rgb = load_and_preprocess(str(path), 72, 64)
        assert chw.shape == (3, 64, 64) and rgb.shape == (64, 64, 3)
