"""Full frame (--image_size H,W --crop none) and tiling (--tile, --tile_stride): the geometry,
the stitching, the end-to-end runs through export and infer.py, and the bad inputs."""
import importlib
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import predict
import train
from conftest import ROOT, assert_deployed_matches_predict, make_synthetic_category
from datasets.tiling import TileGrid, tile_origins
from datasets.transforms import Preprocess
from models.postprocess import Detector
from utils import UserError

SMALL = ["--method", "ortho", "--k", "8", "--no_progress"]


def test_tile_origins_cover_the_side():
    assert tile_origins(128, 64, 64) == [0, 64]
    assert tile_origins(128, 64, 32) == [0, 32, 64]
    assert tile_origins(100, 64, 48) == [0, 36]  # the last tile is flush with the far edge
    assert tile_origins(64, 64, 16) == [0]


def test_split_and_stitch_round_trip_and_average_overlaps_exactly():
    grid = TileGrid((64, 96), 32, 16)
    frames = np.random.RandomState(0).rand(2, 3, 64, 96).astype(np.float32)
    tiles = grid.split(frames)
    assert tiles.shape == (2 * grid.count, 3, 32, 32) and grid.count == 3 * 5
    np.testing.assert_array_equal(tiles[grid.count + 4], frames[1, :, 0:32, 64:96])  # image 1, tile (0, 64)
    np.testing.assert_array_equal(grid.stitch(tiles[:, 1]), frames[:, 1])  # a frame's own tiles give it back
    # Constant tiles: tile i holds the value i; each pixel gets the mean of the tiles covering it.
    constant = np.repeat(np.arange(grid.count, dtype=np.float32), 32 * 32).reshape(grid.count, 32, 32)
    stitched = grid.stitch(np.concatenate([constant, constant + 1]))
    assert stitched.shape == (2, 64, 96)
    assert stitched[0, 0, 0] == 0.0                    # tile 0 only
    assert stitched[0, 0, 20] == 0.5                   # tiles 0 and 1
    assert stitched[0, 20, 20] == (0 + 1 + 5 + 6) / 4  # rows 0-1, columns 0-1 of the 3x5 grid
    np.testing.assert_array_equal(stitched[1], stitched[0] + 1)


def test_stitch_leaves_unscored_tile_borders_out_where_another_tile_scores():
    """EfficientAD's maps are 0 (the normal level) along each edge: seams between overlapping
    tiles must not show that border, the frame's own edges keep it."""
    grid = TileGrid((64, 112), 64, 48)
    maps = np.zeros((2, 64, 64), np.float32)
    maps[:, 8:-8, 8:-8] = 1.0
    stitched = grid.stitch(maps, border=8)[0]
    assert (stitched[8:-8, 8:-8] == 1.0).all() and not stitched[:, :8].any() and not stitched[:, -8:].any()
    assert grid.stitch(maps)[0, 32, 50] == 0.5  # the plain mean mixes tile 1's border in


def test_full_frame_preprocess_and_old_configs():
    pre = Preprocess.from_config({"resize": 256, "crop_size": 224, "crop": "none", "image_size": [48, 80]})
    img = Image.fromarray(np.random.RandomState(1).randint(0, 255, (30, 70, 3), np.uint8))
    chw, rgb = pre.image(img)
    assert chw.shape == (3, 48, 80) and rgb.shape == (48, 80, 3) and pre.map_size == (48, 80)
    mask = Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), ((0, 20), (0, 60))))
    assert pre.mask(mask).shape == (48, 80) and pre.mask(mask)[:16, :11].all() and not pre.mask(mask)[20:].any()
    old = Preprocess.from_config({"resize": 256, "crop_size": 224})  # a model file from before this change
    assert (old.map_size, old.input_shape, old.tiles) == ((224, 224), (3, 224, 224), None)
    tiled = Preprocess.from_config({"resize": 256, "crop_size": 224, "crop": "none", "image_size": [96, 128],
                                    "tile": 64, "tile_stride": 32})
    assert tiled.input_shape == (3, 64, 64) and tiled.map_size == (96, 128) and tiled.tiles.count == 6


def _toy_detector(tiles=None, image_score=None, size=(64, 96)):
    """A numpy 'network': patch scores are the first channel at stride 4."""
    return Detector(lambda x: [x[:, :1, ::4, ::4] ** 2], lambda out, stats: out[0][:, 0], {}, size,
                    image_score=image_score, tiles=tiles)


def test_one_tile_over_the_frame_equals_the_untiled_map():
    frames = np.random.RandomState(2).rand(2, 3, 64, 64).astype(np.float32)
    s0, m0 = _toy_detector(size=(64, 64)).raw(frames)
    s1, m1 = _toy_detector(TileGrid((64, 64), 64, 64), size=(64, 64)).raw(frames)
    np.testing.assert_allclose(m1, m0, atol=1e-5)
    np.testing.assert_allclose(s1, s0, atol=1e-5)


def test_tiled_image_score_hook_sees_the_tile_with_the_largest_patch_score():
    frames = np.zeros((2, 3, 64, 96), np.float32)
    frames[0, 0, 40, 80] = 3.0  # image 0: bottom right tile; image 1: top left
    frames[1, 0, 4, 4] = 2.0
    seen = []

    def hook(outputs, patch_scores, stats):
        seen.append(outputs[0].shape)
        return patch_scores.reshape(len(patch_scores), -1).max(axis=1)

    scores, maps = _toy_detector(TileGrid((64, 96), 32, 32), image_score=hook).raw(frames)
    assert seen == [(2, 1, 8, 8)]  # one tile per image reaches the method's image score
    np.testing.assert_allclose(scores, [9.0, 4.0])
    assert maps.shape == (2, 64, 96) and np.unravel_index(maps[0].argmax(), (64, 96))[1] > 64


def make_wide_category(root, size=(64, 160)):
    """The synthetic category at a non-square size (H, W): images and masks resized."""
    cat = make_synthetic_category(root, size=64)
    for folder, _, files in os.walk(cat):
        for f in files:
            path = os.path.join(folder, f)
            with Image.open(path) as img:
                resample = Image.NEAREST if "ground_truth" in folder else Image.BILINEAR
                img.resize(size[::-1], resample).save(path)
    return cat


def test_full_frame_non_square_through_export_and_infer(tmp_path, r18_weights, capsys):
    """--image_size 256,640 --crop none (the 256x640 frames of the issue's real set, here synthetic):
    train --eval, then export_model.py -> infer.py against predict.py."""
    data = str(tmp_path / "data")
    cat = make_wide_category(data)
    save = str(tmp_path / "run")
    flags = ["--method", "ortho", "--k", "8"]
    assert train.main([*SMALL, "--data_path", data, "--category", "widget", "--image_size", "256,640",
                       "--crop", "none", "--backbone_weights", r18_weights, "--eval", "--save_path", save]) == 0
    metrics = json.load(open(os.path.join(save, "metrics", "widget.json")))
    assert metrics["config"]["image_size"] == [256, 640] and metrics["config"]["crop"] == "none"
    from models import load_model
    assert load_model(os.path.join(save, "widget.pdparams"))["stats"]["mean"].shape == (64 * 160, 8)  # H/4 x W/4
    images = [os.path.join(cat, "test", d, f) for d in ("scratch", "good") for f in ("000.png", "001.png")]
    assert_deployed_matches_predict(save, flags, "widget", images, tmp_path, capsys)
    maps = [f for f in os.listdir(tmp_path / "predict") if f.endswith("_anomaly_map.npy")]
    assert len(maps) == 4 and np.load(tmp_path / "predict" / maps[0]).shape == (256, 640)


def _import_bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module("bench_mosaic")
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def mosaics(mvtec_lite, tmp_path_factory):
    """A few bottle mosaics (each image shrunk to 48 px: 96x96 mosaics) in MVTec layout."""
    root = str(tmp_path_factory.mktemp("mosaic"))
    _import_bench().build_mosaics(os.path.join(mvtec_lite, "bottle"), root, n_train=6, n_good=2, n_defect=3,
                                  n_fillers=10, side=48)
    return root


@pytest.mark.parametrize("method", ["ortho", "coreset"])
def test_tiling_on_mosaics_end_to_end(method, mosaics, tmp_path, r18_weights, capsys):
    """train --eval and predict with overlapping tiles; PaDiM's statistics hold every tile's positions."""
    save = str(tmp_path / method)
    flags = ["--method", method] + (["--k", "8"] if method == "ortho" else ["--coreset_ratio", "0.1"])
    geometry = ["--image_size", "96,96", "--tile", "64", "--tile_stride", "32"]
    assert train.main([*flags, *geometry, "--data_path", mosaics, "--category", "bottle_mosaic", "--eval",
                       "--backbone_weights", r18_weights, "--save_path", save, "--no_progress"]) == 0
    result = json.load(open(os.path.join(save, "metrics", "bottle_mosaic.json")))
    assert 0.0 <= result["image_AUROC"] <= 1.0 and 0.0 <= result["pixel_AUROC"] <= 1.0
    from models import load_model
    stats = load_model(os.path.join(save, "bottle_mosaic.pdparams"))["stats"]
    if method == "ortho":
        assert stats["mean"].shape == (4 * 16 * 16, 8) and int(stats["tiles"]) == 4
    capsys.readouterr()
    image = os.path.join(mosaics, "bottle_mosaic", "test", "good", "000.png")
    assert predict.main([image, *flags, "--category", "bottle_mosaic", "--model_path", save,
                         "--output_dir", str(tmp_path / "pred"), "--no_progress"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert np.load(record["anomaly_map"]).shape == (96, 96)


BAD_GEOMETRY = [
    (["--image_size", "72,96"], "multiples of 16"),
    (["--image_size", "64,96", "--tile", "128"], "exceeds the 64x96 image"),
    (["--image_size", "96,96", "--tile", "40"], "multiples of 16"),
    (["--image_size", "96,96", "--tile", "64", "--tile_stride", "80"], "--tile_stride must be between 1 and"),
    (["--tile", "64"], "--tile needs --image_size"),
    (["--tile_stride", "16"], "--tile must be a positive"),
    (["--crop", "none"], "--crop none needs --image_size"),
    (["--image_size", "64,96", "--crop", "center"], "drop --crop center"),
    (["--image_size", "64,x"], "--image_size must be H,W"),
    (["--method", "efficientad", "--image_size", "320,240"], "takes 256x256 network inputs"),
    (["--method", "coreset", "--image_size", "64,88"], "PatchCore needs network inputs"),
    (["--image_size", "512,512", "--tile", "128", "--k", "100", "--max_stats_gb", "0.5"],
     "would need 0.7 GB while fitting"),
]


@pytest.mark.parametrize("flags,message", BAD_GEOMETRY)
def test_bad_geometry_is_one_line_and_writes_nothing(flags, message, synthetic_root, tmp_path, capsys):
    save = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        from utils import run_cli
        run_cli(lambda: train.main(["--k", "8", *flags, "--data_path", synthetic_root, "--category", "widget",
                                    "--save_path", str(save), "--no_progress"]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and message in err and len(err.splitlines()) == 1, err
    assert not save.exists()


def test_max_stats_gb_counts_tiles():
    from models.padim import statistics_bytes
    base = {"method": "ortho", "k": 100, "resize": 256, "crop_size": 224}
    plain, _ = statistics_bytes(base)
    assert plain == 56 * 56 * 100 * 100 * 4
    tiled = dict(base, crop="none", image_size=[448, 448], tile=224, tile_stride=112)
    assert statistics_bytes(tiled)[0] == 9 * plain  # 3x3 overlapping tiles, each its own positions
    with pytest.raises(UserError, match=r"would need 1\.1 GB while fitting"):
        from models import check_geometry
        check_geometry(tiled, max_stats_gb=1.0)
