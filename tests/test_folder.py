"""Folder mode (--normal_dir / --abnormal_dir / --mask_dir), evaluation without masks, and the
input checks that run before the fit: on a handful of real bottle images at 64 px."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import eval as eval_script
import train as train_script
from datasets.efficientad import list_image_tree
from datasets.folder import split_normals
from models import load_model
from utils import UserError, run_cli

N_GOOD = 10
DEFECTS = {"broken_large": 3, "contamination": 3}
FAST = ["--method", "ortho", "--k", "8", "--resize", "64", "--crop_size", "64", "--seed", "7", "--no_progress"]


def link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(src, dst)


def build_folders(bottle, root):
    """good/, reject/<defect>/, masks/<defect>/<stem>_mask.png from the shared bottle images."""
    for i in range(N_GOOD):
        link(os.path.join(bottle, "train", "good", f"{i:03d}.png"), os.path.join(root, "good", f"{i:03d}.png"))
    for defect, count in DEFECTS.items():
        for i in range(count):
            name = f"{i:03d}.png"
            link(os.path.join(bottle, "test", defect, name), os.path.join(root, "reject", defect, name))
            link(os.path.join(bottle, "ground_truth", defect, f"{i:03d}_mask.png"),
                 os.path.join(root, "masks", defect, f"{i:03d}_mask.png"))
    return {name: os.path.join(root, name) for name in ("good", "reject", "masks")}


def build_mvtec_copy(folders, root, seed=7, ratio=0.2):
    """The same images in the MVTec layout, split as folder mode splits them."""
    train, test = split_normals(sorted(os.listdir(folders["good"])), ratio, seed)
    cat = os.path.join(root, "bottle")
    for part, names in (("train", train), ("test", test)):
        for name in names:
            link(os.path.realpath(os.path.join(folders["good"], name)), os.path.join(cat, part, "good", name))
    for defect in DEFECTS:
        for name in os.listdir(os.path.join(folders["reject"], defect)):
            image = os.path.realpath(os.path.join(folders["reject"], defect, name))
            link(image, os.path.join(cat, "test", defect, name))
            mask = name.replace(".png", "_mask.png")
            link(os.path.realpath(os.path.join(folders["masks"], defect, mask)),
                 os.path.join(cat, "ground_truth", defect, mask))
    return root


def cli(main, argv, capsys):
    """Run an entry point as the command line does: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def folder_flags(folders, masks=True):
    return ["--normal_dir", folders["good"], "--abnormal_dir", folders["reject"], "--category", "bottle",
            *(["--mask_dir", folders["masks"]] if masks else [])]


def rows(save):
    with open(os.path.join(save, "results.csv")) as f:
        return list(csv.DictReader(f))


def metrics_record(save, category="bottle"):
    with open(os.path.join(save, "metrics", f"{category}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(mvtec_lite, r18_weights, tmp_path_factory):
    """One folder-mode run with masks, one without, one MVTec-layout run on the same split."""
    base = tmp_path_factory.mktemp("folder")
    folders = build_folders(os.path.join(mvtec_lite, "bottle"), str(base / "line"))
    mvtec = build_mvtec_copy(folders, str(base / "mvtec"))
    common = [*FAST, "--backbone_weights", r18_weights, "--eval_PRO"]
    saves = {name: str(base / name) for name in ("folder", "nomask", "mvtec")}
    assert train_script.main([*folder_flags(folders), *common, "--save_path", saves["folder"]]) == 0
    assert train_script.main([*folder_flags(folders, masks=False), *common, "--save_path", saves["nomask"]]) == 0
    mvtec_flags = ["--data_path", mvtec, "--category", "bottle"]
    assert train_script.main([*mvtec_flags, *common, "--save_path", saves["mvtec"]]) == 0
    return {"folders": folders, "mvtec": mvtec, "base": base, **saves}


def test_folder_mode_equals_mvtec_layout_on_the_same_split(runs):
    assert rows(runs["folder"]) == rows(runs["mvtec"])
    folder, mvtec = metrics_record(runs["folder"]), metrics_record(runs["mvtec"])
    assert folder["image_AUROC"] > 0.5 and folder["pixel_AUROC"] > 0.5 and folder["PRO"] is not None
    for key in ("calibration", "image_report", "pixel_report"):
        expected = dict(mvtec[key])
        got = dict(folder[key])
        got.pop("source", None), expected.pop("source", None)
        assert got == expected, key
    def scores(record):
        return {(p["defect_type"], os.path.basename(p["image_path"])): p["raw_score"] for p in record["predictions"]}
    assert scores(folder) == scores(mvtec) and len(scores(folder)) == 2 + sum(DEFECTS.values())
    # The split is recorded in the model and the metrics: 2 of the 10 good images are test images.
    split = load_model(os.path.join(runs["folder"], "bottle.pdparams"))["split"]
    assert split == folder["split"] and split["seed"] == 7 and split["normal_images"] == N_GOOD
    assert split["test_normal"] == sorted(os.listdir(os.path.join(runs["mvtec"], "bottle", "test", "good")))
    assert "split" not in mvtec


def test_no_masks_is_image_level(runs, capsys, r18_weights):
    masked, plain = metrics_record(runs["folder"]), metrics_record(runs["nomask"])
    assert plain["no_masks"] is True and "no_masks" not in masked
    assert plain["image_AUROC"] == masked["image_AUROC"]
    assert plain["image_report"] == masked["image_report"]
    assert plain["pixel_AUROC"] is None and plain["PRO"] is None
    # The pixel threshold follows the image threshold (OrthoAD's image score is the map maximum),
    # so every image flagged anomalous has pixels above it: its predicted mask shows where.
    calib = plain["calibration"]
    assert "map maxima" in calib["source"] and calib["pixel_threshold"] == calib["image_threshold"]
    row = rows(runs["nomask"])[0]
    assert row["image_AUROC"] == rows(runs["folder"])[0]["image_AUROC"]
    assert row["pixel_AUROC"] == "" and row["PRO"] == ""
    # MVTec layout without ground_truth/: the same, printed as "no masks".
    data = str(runs["base"] / "mvtec_nomask")
    shutil.copytree(runs["mvtec"], data, symlinks=True)
    shutil.rmtree(os.path.join(data, "bottle", "ground_truth"))
    out_dir = str(runs["base"] / "eval_nomask")
    argv = ["--data_path", data, "--category", "bottle", *FAST, "--model_path", runs["mvtec"], "--save_path", out_dir,
            "--update_thresholds", "False"]
    code, out, _ = cli(eval_script.main, argv, capsys)
    assert code == 0
    table = out[out.index("category"):]
    assert table.count("no masks") == 2, out
    assert metrics_record(out_dir)["no_masks"] is True
    assert rows(out_dir)[0]["image_AUROC"] == rows(runs["mvtec"])[0]["image_AUROC"]


def test_eval_reuses_the_stored_split_and_refuses_a_changed_folder(runs, capsys, tmp_path):
    # Other --seed / --normal_test_ratio: the model's own split is used, so the metrics are the training run's.
    out = str(tmp_path / "eval")
    flags = [*folder_flags(runs["folders"]), *FAST, "--model_path", runs["folder"], "--eval_PRO",
             "--update_thresholds", "False"]
    code, _, err = cli(eval_script.main, [*flags, "--seed", "1", "--normal_test_ratio", "0.5", "--save_path", out],
                       capsys)
    assert code == 0, err
    assert rows(out) == rows(runs["folder"])
    assert metrics_record(out)["split"] == metrics_record(runs["folder"])["split"]
    # One more good image: a re-split would test on training images, so evaluation refuses.
    good = runs["folders"]["good"]
    extra = os.path.join(good, "999.png")
    shutil.copy(os.path.join(good, "000.png"), extra)
    try:
        code, _, err = cli(eval_script.main, [*flags, "--save_path", str(tmp_path / "eval2")], capsys)
    finally:
        os.remove(extra)
    assert code != 0 and err.count("\n") == 1 and "retrain" in err, err
    assert not os.path.exists(str(tmp_path / "eval2"))


# ---------------------------------------------------------------- bad input, before any fit
@pytest.fixture
def no_fit(monkeypatch):
    """Every bad input below must stop the run before the fit starts."""
    from models.padim import PaDiM

    def fit(*_, **__):
        raise AssertionError("the fit started")
    monkeypatch.setattr(PaDiM, "fit", fit)


@pytest.fixture
def line(mvtec_lite, tmp_path):
    return build_folders(os.path.join(mvtec_lite, "bottle"), str(tmp_path / "line"))


def assert_refused(capsys, tmp_path, argv, *needles):
    save = str(tmp_path / "out")
    code, _, err = cli(train_script.main, [*argv, *FAST, "--eval", "--save_path", save], capsys)
    assert code != 0, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(os.path.join(save, "bottle.pdparams"))


def test_half_masked_set_names_the_first_image_without_a_mask(line, capsys, tmp_path, no_fit):
    os.remove(os.path.join(line["masks"], "contamination", "001_mask.png"))
    assert_refused(capsys, tmp_path, folder_flags(line), os.path.join("contamination", "001.png"), "no mask for")


def test_bad_folder_inputs_fail_in_one_line(line, capsys, tmp_path, no_fit):
    assert_refused(capsys, tmp_path, [*folder_flags(line), "--data_path", "demo_data"], "exclude each other")
    assert_refused(capsys, tmp_path, ["--normal_dir", str(tmp_path / "nowhere")], "--normal_dir folder not found")
    os.makedirs(tmp_path / "empty")
    assert_refused(capsys, tmp_path, ["--normal_dir", str(tmp_path / "empty")], "no images in --normal_dir")
    assert_refused(capsys, tmp_path, ["--normal_dir", line["good"], "--abnormal_dir", str(tmp_path / "empty")],
                   "no images in --abnormal_dir")
    assert_refused(capsys, tmp_path, [*folder_flags(line)[:6], "--mask_dir", str(tmp_path / "empty")],
                   "no masks in --mask_dir")
    assert_refused(capsys, tmp_path, ["--mask_dir", line["masks"]], "give --normal_dir too")
    assert_refused(capsys, tmp_path, [*folder_flags(line), "--normal_test_ratio", "1"], "--normal_test_ratio")
    stray = os.path.join(line["masks"], "broken_large", "017_mask.png")
    shutil.copy(os.path.join(line["masks"], "broken_large", "000_mask.png"), stray)
    assert_refused(capsys, tmp_path, folder_flags(line), "017_mask.png", "matches no image")
    os.remove(stray)


def test_bad_files_fail_before_the_fit(line, capsys, tmp_path, no_fit):
    mask = os.path.join(line["masks"], "broken_large", "002_mask.png")
    os.remove(mask)
    Image.new("L", (32, 48)).save(mask)
    assert_refused(capsys, tmp_path, folder_flags(line), "002_mask.png", "32x48")
    os.remove(mask)
    os.symlink(os.path.realpath(os.path.join(line["masks"], "broken_large", "000_mask.png")), mask)
    # A truncated training image: named before the fit (the check covers every training image).
    names = sorted(os.listdir(line["good"]))
    train, _ = split_normals(names, 0.2, 7)
    broken = os.path.join(line["good"], train[-1])
    data = open(os.path.realpath(broken), "rb").read()
    os.remove(broken)
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])
    assert_refused(capsys, tmp_path, folder_flags(line), train[-1])


def test_flat_folders_and_both_mask_names(line, tmp_path):
    from datasets.folder import FolderDataset
    flat = tmp_path / "flat"
    for i, defect in enumerate(DEFECTS):  # one flat reject folder; masks flat, named <stem>.png or <stem>_mask.png
        src = os.path.realpath(os.path.join(line["reject"], defect, "000.png"))
        link(src, str(flat / "reject" / f"{defect}.png"))
        mask = os.path.realpath(os.path.join(line["masks"], defect, "000_mask.png"))
        link(mask, str(flat / "masks" / (f"{defect}.png" if i else f"{defect}_mask.png")))
    data = FolderDataset(line["good"], str(flat / "reject"), str(flat / "masks"), test_ratio=0.2, seed=7)
    assert data.categories("all") == ["line"]  # the normal folder's parent names the category
    defective = [s for s in data.test_samples("line") if s.label]
    assert [(s.defect_type, os.path.basename(s.image_path), os.path.basename(s.mask_path)) for s in defective] == [
        ("reject", "broken_large.png", "broken_large_mask.png"), ("reject", "contamination.png", "contamination.png")]
    # Flat masks for defect subfolders whose images share stems: which image a mask belongs to is unknown.
    flat_masks = tmp_path / "flat_masks"
    link(os.path.realpath(os.path.join(line["masks"], "broken_large", "000_mask.png")), str(flat_masks / "000.png"))
    with pytest.raises(UserError, match="could belong to several images"):
        FolderDataset(line["good"], line["reject"], str(flat_masks))


def test_mvtec_layout_mask_mistakes(line, capsys, tmp_path, no_fit):
    data = build_mvtec_copy(line, str(tmp_path / "mvtec"))
    flags = ["--data_path", data, "--category", "bottle"]
    gt = os.path.join(data, "bottle", "ground_truth")
    shutil.copy(os.path.join(gt, "broken_large", "000_mask.png"), os.path.join(gt, "broken_large", "000_mask_x.png"))
    assert_refused(capsys, tmp_path, flags, "000_mask_x.png", "matches no image")
    os.remove(os.path.join(gt, "broken_large", "000_mask_x.png"))
    shutil.rmtree(os.path.join(gt, "contamination"))  # masks for one defect type only: half-masked
    assert_refused(capsys, tmp_path, flags, "no mask for", os.path.join("contamination", "000.png"))


def test_unreadable_natural_images_are_skipped_in_one_line(mvtec_lite, tmp_path, capsys):
    folder = tmp_path / "natural"
    (folder / "sub").mkdir(parents=True)
    good = sorted(os.listdir(os.path.join(mvtec_lite, "bottle", "train", "good")))[:3]
    for name in good:
        shutil.copy(os.path.join(mvtec_lite, "bottle", "train", "good", name), folder / "sub" / name)
    (folder / "multipage.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    data = (folder / "sub" / good[0]).read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "ok.jpg")
    paths = list_image_tree([str(folder)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 2 of 6" in err and "multipage.tif" in err and "truncated.png" in err, err
    assert sorted(os.path.basename(p) for p in paths) == sorted(good + ["ok.jpg"])
