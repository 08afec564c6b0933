"""High-resolution check on real images: 2x2 mosaics of MVTec bottle images (512x512 from 256^2;
three good images and a good or defective fourth, its mask placed in its quarter), scored by the
plain 256 + 224 centre-crop pipeline and by tiles at the mosaic's native resolution.

    python benchmarks/bench_mosaic.py [--methods ortho coreset] [--train 200] [--good 40]

Prints per pipeline: image AUROC, pixel AUROC, and for the small defects (mask area below the
median of the defective mosaics, against the good mosaics) image AUROC, pixel AUROC and the
recall at the F1-optimal image threshold; fit and test seconds. Asserts nothing.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, WEIGHTS, cpu_header, require_shared  # noqa: E402

from pipeline import cli  # noqa: E402
from pipeline import evaluation  # noqa: E402
from report import metrics  # noqa: E402
import train  # noqa: E402
from datasets.transforms import Preprocess  # noqa: E402

CATEGORY = "bottle_mosaic"
PIPELINES = {  # name -> geometry flags
    "plain 256+224": [],
    "tiles 512 / 256": ["--image_size", "512,512", "--tile", "256"],
}
METHOD_FLAGS = {"ortho": ["--method", "ortho", "--k", "100"], "coreset": ["--method", "coreset"]}


def _images(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


def _mosaic(paths, side, mode):
    """2x2 mosaic of four images (row by row), each resized to side x side if it is not already."""
    out = Image.new(mode, (2 * side, 2 * side))
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (side, side):
                img = img.resize((side, side), Image.NEAREST if mode == "L" else Image.LANCZOS)
            out.paste(img, ((i % 2) * side, (i // 2) * side))
    return out


def build_mosaics(src, out_root, n_train=100, n_good=40, n_defect=None, n_fillers=60, side=None, seed=0):
    """MVTec-layout category `bottle_mosaic` under out_root from the category folder `src`.
    Training mosaics draw from the training images left after `n_fillers` are set aside; test
    mosaics fill their good quarters from those and the test/good images only (no training image
    appears at test time). -> the category folder."""
    rng = np.random.RandomState(seed)
    train_pool = _images(os.path.join(src, "train", "good"))
    order = rng.permutation(len(train_pool))
    fillers = [train_pool[i] for i in order[:n_fillers]] + _images(os.path.join(src, "test", "good"))
    fit_pool = [train_pool[i] for i in order[n_fillers:]]
    if side is None:
        with Image.open(fit_pool[0]) as img:
            side = img.size[0]
    cat = os.path.join(out_root, CATEGORY)
    for sub in ("train/good", "test/good"):
        os.makedirs(os.path.join(cat, sub))
    for i in range(n_train):
        picks = [fit_pool[j] for j in rng.choice(len(fit_pool), 4, replace=False)]
        _mosaic(picks, side, "RGB").save(os.path.join(cat, "train", "good", f"{i:03d}.png"))
    for i in range(n_good):
        picks = [fillers[j] for j in rng.choice(len(fillers), 4, replace=False)]
        _mosaic(picks, side, "RGB").save(os.path.join(cat, "test", "good", f"{i:03d}.png"))
    defects = [(d, p) for d in sorted(os.listdir(os.path.join(src, "test"))) if d != "good"
               for p in _images(os.path.join(src, "test", d))]
    if n_defect is not None:
        defects = [defects[i] for i in np.sort(rng.choice(len(defects), n_defect, replace=False))]
    blank = os.path.join(out_root, "blank_mask.png")
    Image.new("L", (side, side)).save(blank)
    for i, (defect, path) in enumerate(defects):
        quarter = rng.randint(4)
        picks = [fillers[j] for j in rng.choice(len(fillers), 4, replace=False)]
        masks = [blank] * 4
        picks[quarter] = path
        stem = os.path.splitext(os.path.basename(path))[0]
        masks[quarter] = os.path.join(src, "ground_truth", defect, f"{stem}_mask.png")
        for sub in ("test", "ground_truth"):
            os.makedirs(os.path.join(cat, sub, defect), exist_ok=True)
        _mosaic(picks, side, "RGB").save(os.path.join(cat, "test", defect, f"{i:03d}.png"))
        _mosaic(masks, side, "L").save(os.path.join(cat, "ground_truth", defect, f"{i:03d}_mask.png"))
    os.remove(blank)
    return cat


def defect_areas(samples):
    """Mask pixels of each test mosaic at its native resolution (0 for good ones)."""
    areas = []
    for s in samples:
        if s.mask_path is None:
            areas.append(0)
        else:
            with Image.open(s.mask_path) as m:
                areas.append(int((np.asarray(m) > 0).sum()))
    return np.array(areas)


def run_pipeline(data_root, save, method_flags, geometry, no_progress=True):
    """Fit (all training mosaics), then score the test mosaics -> figures."""
    common = [*method_flags, *geometry, "--data_path", data_root, "--category", CATEGORY, "--save_path", save,
              "--backbone_weights", WEIGHTS] + (["--no_progress"] if no_progress else [])
    t0 = time.perf_counter()
    assert train.main(common + ["--calib_ratio", "0"]) == 0
    fit_s = time.perf_counter() - t0
    parser = cli.parser_with(cli.add_model_args, cli.add_data_args, cli.add_runtime_args,
                                cli.add_eval_args)
    args = cli.parse(parser, [a for a in common if a not in ("--backbone_weights", WEIGHTS)])
    state, detector, _ = evaluation.load_detector(args, CATEGORY)
    t1 = time.perf_counter()
    result = evaluation.evaluate_category(args, CATEGORY, detector, Preprocess.from_config(state["config"]))
    test_s = time.perf_counter() - t1
    arrays = result["arrays"]
    labels, scores, maps, masks = arrays["labels"], arrays["scores"], arrays["maps"], arrays["masks"]
    from datasets import open_dataset
    areas = defect_areas(open_dataset(args).test_samples(CATEGORY))
    small = (labels == 1) & (areas < np.median(areas[labels == 1]))
    subset = small | (labels == 0)
    threshold = result["calibration"]["image_threshold"]
    return {"image_AUROC": result["image_AUROC"], "pixel_AUROC": result["pixel_AUROC"],
            "small_image_AUROC": metrics.auroc(labels[subset], scores[subset]),
            "small_pixel_AUROC": metrics.auroc(masks[subset], maps[subset]),
            "small_recall": float((scores[small] >= threshold).mean()), "small_count": int(small.sum()),
            "fit_s": fit_s, "test_ms_per_image": 1000 * test_s / len(labels),
            "map": "x".join(map(str, maps.shape[1:]))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ortho"], choices=sorted(METHOD_FLAGS))
    p.add_argument("--train", type=int, default=200, help="training mosaics")
    p.add_argument("--good", type=int, default=40, help="good test mosaics")
    p.add_argument("--defects", type=int, default=None, help="defective test mosaics (default: every defect image)")
    p.add_argument("--keep", default=None, help="build the mosaics here and keep them (default: a temp folder)")
    args = p.parse_args(argv)
    require_shared()
    print(cpu_header())
    root = args.keep or tempfile.mkdtemp(prefix="mosaic_")
    try:
        data = os.path.join(root, "data")
        cat = build_mosaics(os.path.join(DATA, "bottle"), data, args.train, args.good, args.defects)
        n_test = sum(len(f) for _, _, f in os.walk(os.path.join(cat, "test")))
        print(f"mosaics: {args.train} training, {n_test} test ({args.good} good), 512x512 from 256^2 bottle images")
        header = (f"{'method':8} {'pipeline':16} {'map':8} {'image AUROC':>11} {'pixel AUROC':>11} "
                  f"{'small: img AUROC':>16} {'px AUROC':>8} {'recall':>6} {'fit s':>6} {'test ms/img':>11}")
        print(header)
        for method in args.methods:
            for name, geometry in PIPELINES.items():
                save = os.path.join(root, "runs", f"{method}_{name.split()[0]}")
                r = run_pipeline(data, save, METHOD_FLAGS[method], geometry)
                print(f"{method:8} {name:16} {r['map']:8} {r['image_AUROC']:11.4f} {r['pixel_AUROC']:11.4f} "
                      f"{r['small_image_AUROC']:16.4f} {r['small_pixel_AUROC']:8.4f} {r['small_recall']:6.3f} "
                      f"{r['fit_s']:6.1f} {r['test_ms_per_image']:11.1f}", flush=True)
        print(f"small defects: the {r['small_count']} defective mosaics whose mask area is below the median, "
              f"against the good mosaics; recall at the F1-optimal image threshold")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from utils import run_cli
    run_cli(main)
