"""What the entry scripts run: flags, training, evaluation and prediction per category.

train.py / eval.py / predict.py only parse flags and call these functions.
"""
import argparse
import csv
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import metrics
import scaleout
from datasets import iterate_batches, open_dataset, resolve_data_args
from datasets.mvtec import has_masks
from datasets.transforms import Preprocess, parse_image_size
from datasets.verify import check_samples
from models import build_method, check_geometry, check_model_matches, load_model, save_model
from models.backbone import ARCHS, make_engine
from models.parallel import set_cpu_threads
from models.padim_sums import save_sums
from models.postprocess import Detector
from utils import (UserError, dumps_json, fmt, format_table, peak_rss_mb, set_seed, str2bool,
                   write_csv_atomic, write_text_atomic)
import report
from results import RESULT_HEADER, run_name
import visualize

# efficientad --lite: 128 px student crops, 600 steps in a 13 min time box (bottle, 2 CPU cores:
# 1.3 s/step; teacher pass and evaluation bring the run to ~15 min)
LITE_STEPS, LITE_MINUTES, LITE_CROP = 600, 13.0, 128


# ---------------------------------------------------------------- flags
def add_model_args(parser):
    from models import METHODS
    from models.nn_index import INDEX_KINDS
    parser.add_argument("--method", default="ortho", choices=sorted(METHODS),
                        help="feature reduction / method: sample (PaDiM), h_sample, ortho (OrthoAD), svd_ortho, gaussian, "
                             "coreset (PatchCore)")
    parser.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone")
    parser.add_argument("--k", type=int, default=100, help="reduced feature dimension")
    parser.add_argument("--coreset_ratio", type=float, default=0.01,
                        help="coreset: share of the training patches kept in the memory bank")
    parser.add_argument("--num_neighbors", type=int, default=9,
                        help="coreset: bank neighbours in the image-score re-weighting (1: plain maximum)")
    parser.add_argument("--faiss", action="store_true",
                        help="coreset: nearest-neighbour search with faiss IndexFlatL2 (pip install faiss-cpu); "
                             "same as --nn_search faiss")
    parser.add_argument("--nn_search", default="grouped", choices=INDEX_KINDS,
                        help="coreset: exact nearest-neighbour search: grouped (bank grouped around its first coreset "
                             "centres, triangle-inequality pruning), brute (every distance) or faiss")
    parser.add_argument("--model_size", default="small", choices=["small", "medium"], help="efficientad: PDN size")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="efficientad: training steps (default: the paper's 70000; 60000 with --distill)")
    parser.add_argument("--train_minutes", type=float, default=None,
                        help="efficientad: time box; training stops after this many minutes (lr drop at 95%%)")
    parser.add_argument("--lite", action="store_true",
                        help=f"efficientad: CPU setting, --train_steps {LITE_STEPS} within --train_minutes {LITE_MINUTES:g} "
                             f"on --train_crop {LITE_CROP}")
    parser.add_argument("--teacher_weights", default=None,
                        help="efficientad: distilled teacher .pdparams (written there by --distill)")
    parser.add_argument("--train_crop", type=int, default=None,
                        help="efficientad: train the student on random CROPxCROP windows (multiple of 4, "
                             ">= 64) of each image; default: whole images, as the paper")
    parser.add_argument("--imagenet_dir", default=None, help="efficientad: images for the student's ImageNet penalty")
    parser.add_argument("--distill", action="store_true",
                        help="efficientad: distil a teacher PDN from --backbone_weights on --distill_data, then exit")
    parser.add_argument("--distill_data", nargs="+", default=None, metavar="DIR",
                        help="efficientad --distill: folders of natural images (searched recursively)")
    parser.add_argument("--resume", action="store_true", help="efficientad: continue from the last checkpoint")
    parser.add_argument("--checkpoint_every", type=int, default=500, help="efficientad: steps between checkpoints")
    parser.add_argument("--seed", type=int, default=521, help="seed for projections and sampling")
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    parser.add_argument("--crop_size", type=int, default=224, help="centre crop fed to the network")
    parser.add_argument("--image_size", default=None, metavar="H,W",
                        help="full frame: resize the whole image to exactly HxW (any aspect ratio, no crop; "
                             "implies --crop none) instead of --resize + --crop_size")
    parser.add_argument("--crop", default=None, choices=["center", "none"],
                        help="center: --resize shorter side, --crop_size centre square (default); "
                             "none: the whole image at --image_size (default when --image_size is given)")
    parser.add_argument("--tile", type=int, default=0,
                        help="high resolution: the network sees TILE x TILE squares of the image resized to "
                             "--image_size (the whole image, never a centre crop); the maps are stitched back")
    parser.add_argument("--tile_stride", type=int, default=None,
                        help="pixels between tiles (default --tile; smaller overlaps them, overlaps averaged)")
    parser.add_argument("--save_path", default=None, help="output folder (default output/<method>_<arch>_k<k>)")
    parser.add_argument("--model_path", default=None,
                        help="model file, or folder of <category>.pdparams (default: --save_path)")


def add_data_args(parser):
    parser.add_argument("--data_path", default=None, help="MVTec-layout root folder (default: demo_data)")
    parser.add_argument("--category", default="all",
                        help="all, objects, textures, one category or a comma list; folder mode: the "
                             "category's name (default: the parent folder of --normal_dir)")
    parser.add_argument("--normal_dir", default=None,
                        help="folder mode (instead of --data_path): a folder of good images")
    parser.add_argument("--abnormal_dir", default=None,
                        help="folder mode: rejected images, flat or one subfolder per defect type")
    parser.add_argument("--mask_dir", default=None,
                        help="folder mode: masks named <stem>.png or <stem>_mask.png, flat or per defect type")
    parser.add_argument("--normal_test_ratio", type=float, default=0.2,
                        help="folder mode: share of --normal_dir split off (seeded by --seed) as test images")
    parser.add_argument("--batch_size", type=int, default=8, help="images loaded per step")
    parser.add_argument("--num_workers", type=int, default=2, help="image-decoding threads")


def add_runtime_args(parser):
    parser.add_argument("--engine", default="inference", choices=["inference", "eager"],
                        help="run the feature network with Paddle Inference (fast, same as deployment) or eager")
    parser.add_argument("--use_gpu", type=str2bool, default=False)
    parser.add_argument("--enable_mkldnn", type=str2bool, default=True, help="oneDNN on CPU")
    parser.add_argument("--cpu_threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    scaleout.add_scaleout_args(parser)


def add_eval_args(parser):
    parser.add_argument("--eval_PRO", action="store_true", help="also compute PRO (area up to FPR 0.3)")
    parser.add_argument("--non_partial_AUC", action="store_true",
                        help="AUROC with the OrthoAD reference's bin rule instead of sklearn (reads higher)")
    parser.add_argument("--save_pic", type=str2bool, default=False, help="figures per test image")


def parse(parser, argv=None):
    args = parser.parse_args(argv)
    resolve_data_args(args)
    parse_geometry(args)
    set_cpu_threads(getattr(args, "cpu_threads", None))  # statistics, scoring and BLAS follow --cpu_threads too
    if hasattr(args, "method"):
        build_method(runtime_config(method_config(args), args))  # bad method flags fail now, in one line
    if args.save_path is None:
        args.save_path = os.path.join("output", run_name(args))
    apply_method_defaults(args)
    if hasattr(args, "method"):
        check_geometry(method_config(args), getattr(args, "max_stats_gb", None))
    return args


def parse_geometry(args):
    """--image_size "H,W" -> (H, W); --crop defaults to none with --image_size or --tile, else center."""
    if getattr(args, "image_size", None) is not None:
        args.image_size = parse_image_size(args.image_size)
    if hasattr(args, "crop") and args.crop is None:
        args.crop = "none" if args.image_size is not None or args.tile else "center"
    if getattr(args, "tile_stride", None) is None and hasattr(args, "tile"):
        args.tile_stride = args.tile


def apply_method_defaults(args):
    """EfficientAD's PDN takes 256x256 images (no 224 ImageNet crop; full frames and tiles are
    checked by check_geometry) and the paper's step counts."""
    if args.method != "efficientad":
        return
    from models.efficientad import IMAGE_SIZE, PAPER_DISTILL_STEPS, PAPER_TRAIN_STEPS, check_train_crop
    args.resize = args.crop_size = IMAGE_SIZE
    if getattr(args, "lite", False):
        args.train_steps = args.train_steps or LITE_STEPS
        args.train_minutes = args.train_minutes or LITE_MINUTES
        args.train_crop = args.train_crop or LITE_CROP
    if args.train_steps is None:
        args.train_steps = PAPER_DISTILL_STEPS if getattr(args, "distill", False) else PAPER_TRAIN_STEPS
    if args.train_steps < 1:
        raise UserError(f"--train_steps must be at least 1, got {args.train_steps}")
    check_train_crop(getattr(args, "train_crop", None))


def method_config(args):
    keys = ("method", "arch", "k", "seed", "resize", "crop_size", "crop", "image_size", "tile", "tile_stride",
            "coreset_ratio", "num_neighbors", "model_size", "train_steps", "train_crop")
    cfg = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    cfg["backbone_weights"] = os.path.basename(args.backbone_weights) if getattr(args, "backbone_weights", None) else "imagenet"
    return cfg


def runtime_config(config, args):
    """The model's config plus the flags that change how it runs, not what it computes
    (never saved: a model trained with --faiss scores the same without it)."""
    search = "faiss" if getattr(args, "faiss", False) else getattr(args, "nn_search", "grouped")
    return dict(config, nn_search=search)


def engine_kwargs(args):
    kw = {"engine": args.engine}
    if args.engine == "inference":
        kw.update(use_gpu=args.use_gpu, enable_mkldnn=args.enable_mkldnn, cpu_threads=args.cpu_threads)
    else:
        import paddle
        paddle.set_device("gpu" if args.use_gpu else "cpu")
    return kw


def model_path_for(args, category):
    base = args.model_path or args.save_path
    if base.endswith(".pdparams"):
        return base
    return os.path.join(base, f"{category}.pdparams")


# ---------------------------------------------------------------- per-category work
def image_batches(samples, args, preprocess):
    return lambda: (preprocess.network_inputs(images) for _, images, _, _ in
                    iterate_batches(samples, args.batch_size, preprocess, workers=args.num_workers))


def split_calibration(samples, ratio, seed):
    """Hold out normal training images for threshold calibration when there are no test labels."""
    n_calib = int(round(len(samples) * ratio))
    if ratio <= 0 or n_calib < 1 or len(samples) - n_calib < 2:
        return samples, []
    order = np.random.RandomState(seed).permutation(len(samples))
    calib = set(order[:n_calib].tolist())
    return ([s for i, s in enumerate(samples) if i not in calib],
            [s for i, s in enumerate(samples) if i in calib])


def detector_for(state, engine, method):
    preprocess = Preprocess.from_config(state["config"])
    return Detector.for_method(method, engine, state["stats"], preprocess.map_size, state.get("calibration"),
                               tiles=preprocess.tiles)


def train_category(args, category):
    """Fit one category, calibrate, optionally evaluate; the model file is written once, at the end."""
    set_seed(args.seed)
    cfg = method_config(args)
    method = build_method(runtime_config(cfg, args))
    dataset = open_dataset(args)
    preprocess = Preprocess.from_config(cfg)
    samples = dataset.train_samples(category)
    # A broken image or mask fails before the fit, not after (PNG CRCs: ~1/6 of decoding them; bench_verify.py).
    group = scaleout.split_group()  # set when the workers share this category's images
    checked = samples + (dataset.test_samples(category) if args.eval else [])
    check_samples(checked if group is None else scaleout.share_of(checked, group), args.num_workers,
                  progress=not args.no_progress)
    fit_samples, calib_samples = (samples, []) if args.eval else split_calibration(samples, args.calib_ratio, args.seed)
    t0 = time.perf_counter()
    options = method.fit_options(args, category) if hasattr(method, "fit_options") else {}
    if group is not None:
        options["group"] = group
    if getattr(args, "keep_sums", False):
        options["keep_sums"] = True
    shares = group is not None and not getattr(method, "DATA_PARALLEL", False)  # else each reads all
    mine = scaleout.share_of(fit_samples, group) if shares else fit_samples
    state, engine = method.fit(image_batches(mine, args, preprocess), engine_kwargs(args),
                               args.backbone_weights, progress=not args.no_progress, **options)
    fit_s = time.perf_counter() - t0
    sums = state.pop("sums", None)
    state["config"] = cfg
    if group is not None and group.rank != 0:  # worker 0 calibrates and writes the model
        if args.eval:  # each worker scores its share of the test images
            evaluate_category(args, category, detector_for(state, engine, method), preprocess)
        return {"category": category}
    state["category"] = category
    state["train_images"] = len(fit_samples)
    if dataset.split is not None:
        state["split"] = dataset.split  # eval.py evaluates on these test images again
    detector = detector_for(state, engine, method)
    result = None
    if calib_samples:
        scores, maps = [], []
        for _, images, _, _ in iterate_batches(calib_samples, args.batch_size, preprocess):
            s, m = detector.raw(images)
            scores.append(s)
            maps.append(m)
        state["calibration"] = normal_calibration(np.concatenate(scores), np.concatenate(maps), len(calib_samples))
    if args.eval:
        result = evaluate_category(args, category, detector, preprocess, dataset)
        state["calibration"] = result["calibration"]
    result = result or {"category": category}
    if dataset.split is not None:
        result["split"] = dataset.split
    result["config"] = cfg
    result["timing"] = {"fit_s": fit_s, "train_images": len(fit_samples), "peak_rss_mb": peak_rss_mb()}
    if sums is not None:  # before the model: an update never reads sums older than their model
        save_sums(model_path_for(args, category), sums, cfg)
    save_model(model_path_for(args, category), state)
    return result


def distill_teacher(args):
    """train.py --method efficientad --distill: write the teacher PDN (once, for every category)."""
    if args.method != "efficientad":
        raise UserError("--distill is for --method efficientad")
    if not args.distill_data:
        raise UserError("--distill needs --distill_data DIR [DIR ...] (any folders of natural images)")
    if scaleout.world()[1] > 1:  # every worker would write the same teacher file
        raise UserError("--distill runs in one process, not under paddle.distributed.launch")
    from models.efficientad import distill_teacher as distill
    set_seed(args.seed)
    out = args.teacher_weights or os.path.join(args.save_path, f"teacher_{args.model_size}.pdparams")
    info = distill(out, args.model_size, args.arch, args.backbone_weights, args.distill_data, args.train_steps,
                   args.seed, engine_kwargs(args), progress=not args.no_progress, resume=args.resume,
                   checkpoint_every=args.checkpoint_every, minutes=args.train_minutes)
    print(f"teacher: {out}  ({info['steps']} steps, {info['seconds'] / 60:.1f} min, loss {fmt(info['loss'])})")
    return 0


def normal_calibration(scores, maps, count):
    """Thresholds from normal images only: the largest score seen, so every held-out normal
    image and pixel is below threshold."""
    top = float(maps.max())
    return {"image_threshold": float(scores.max()), "pixel_threshold": top,
            "image_min": float(scores.min()), "image_max": float(scores.max()),
            "pixel_min": float(maps.min()), "pixel_max": top,
            "source": f"max over {count} held-out normal training images"}


def evaluate_category(args, category, detector, preprocess, dataset=None):
    """Score the test set (preprocessed as the model's `preprocess` says); metrics, F1-optimal
    thresholds, optional pictures. Defective images without masks: image-level metrics only.
    Under a launch with the category split, each worker scores its share and worker 0 the metrics."""
    samples = every_sample = (dataset or open_dataset(args)).test_samples(category)
    no_masks = any(s.label for s in every_sample) and not has_masks(every_sample)
    group = scaleout.split_group()  # set when the workers share this category's images
    if group is not None:
        samples = scaleout.share_of(samples, group)
    n = len(samples)
    size = detector.map_size
    maps = np.empty((n, *size), np.float32)
    masks = np.empty((n, *size), np.uint8)
    scores = np.empty(n, np.float32)
    rgbs = np.empty((n, *size, 3), np.uint8) if args.save_pic or getattr(args, "report", False) else None
    pos = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"test {category}", unit="img", disable=args.no_progress, leave=False)
    for batch, images, rgb, mask in iterate_batches(samples, args.batch_size, preprocess,
                                                    with_mask=True, workers=args.num_workers):
        s, m = detector.raw(images)
        sl = slice(pos, pos + len(batch))
        scores[sl], maps[sl], masks[sl] = s, m, mask
        if rgbs is not None:
            rgbs[sl] = rgb
        pos += len(batch)
        bar.update(len(batch))
    bar.close()
    if group is not None:  # worker 0 computes the metrics on every worker's scores, in image order
        gathered = scaleout.gather_arrays(group, (scores, maps, masks, rgbs), "collecting the test scores")
        if gathered is None:
            return None
        (scores, maps, masks, rgbs), samples, n = gathered, every_sample, len(every_sample)
    labels = np.array([s.label for s in samples])
    test_s = time.perf_counter() - t0
    result = {"category": category, "test_images": n, "ms_per_image": 1000 * test_s / n}
    result["image_AUROC"] = metrics.auroc(labels, scores, args.non_partial_AUC)
    result["pixel_AUROC"] = None if no_masks else metrics.auroc(masks, maps, args.non_partial_AUC)
    result["PRO"] = pro_curve = None
    if no_masks:
        result["no_masks"] = True  # masks stay all-zero arrays: pixel metrics are not defined
    if args.eval_PRO and not no_masks:
        t1 = time.perf_counter()
        pro_curve = metrics.pro_curve(masks, maps)  # kept for the report's plot: computed once
        if pro_curve is not None:
            result["PRO"] = metrics.area_up_to(pro_curve[0], pro_curve[1], metrics.PRO_FPR_LIMIT,
                                               args.non_partial_AUC)
        result["pro_s"] = time.perf_counter() - t1
    if labels.any() and not labels.all():
        calib = {"image_threshold": metrics.f1_optimal_threshold(labels, scores),
                 "image_min": float(scores.min()), "image_max": float(scores.max()),
                 "pixel_min": float(maps.min()), "pixel_max": float(maps.max()),
                 "source": f"F1-optimal on the {n} test images of {category}"}
        if no_masks:  # the pixel threshold as training without labels sets it: above every normal pixel
            normals = int((labels == 0).sum())
            calib["pixel_threshold"] = float(maps[labels == 0].max())
            calib["source"] = (f"image threshold F1-optimal on the {n} test images of {category}; no masks: "
                               f"pixel threshold the max over its {normals} normal test images")
        else:
            calib["pixel_threshold"] = metrics.f1_optimal_threshold(masks, maps)
    else:
        calib = normal_calibration(scores[labels == 0], maps[labels == 0], int((labels == 0).sum()))
    result["calibration"] = calib
    result["image_report"] = metrics.classification_report(labels, scores, calib["image_threshold"])
    result["pixel_report"] = metrics.classification_report(masks, maps, calib["pixel_threshold"])
    result["predictions"] = [{"image_path": s.image_path, "defect_type": s.defect_type, "label": int(s.label),
                              "raw_score": float(v)} for s, v in zip(samples, scores)]
    # In-memory only (not written to metrics JSON): for reports built right after evaluation.
    result["arrays"] = {"scores": scores, "maps": maps, "masks": masks, "labels": labels, "rgbs": rgbs,
                        "pro_curve": None if pro_curve is None else pro_curve[:2]}
    if args.save_pic:
        detector.calibration = calib
        out_dir = os.path.join(args.save_path, "pictures", category)
        for i, s in enumerate(tqdm(samples, desc=f"pictures {category}", unit="img", disable=args.no_progress, leave=False)):
            pred = detector.calibrated(scores[i:i + 1], maps[i:i + 1])[0]
            stem = os.path.splitext(os.path.basename(s.image_path))[0]
            visualize.save_prediction_figure(os.path.join(out_dir, f"{s.defect_type}_{stem}.png"), rgbs[i],
                                   pred["anomaly_map"], pred["pred_mask"], masks[i],
                                   title=f"{category}/{s.defect_type}/{stem}  score {pred['pred_score']:.3f}")
    return result


def print_reports(result):
    for kind in ("image_report", "pixel_report"):
        r = result.get(kind)
        if r and kind == "pixel_report" and result.get("no_masks"):
            print(f"  segmentation (pixel): no masks; threshold {r['threshold']:.4f} (max of the normal images)")
        elif r:
            name = "classification (image)" if kind == "image_report" else "segmentation (pixel)"
            print(f"  {name}: threshold {r['threshold']:.4f}  precision {r['precision']:.4f}  "
                  f"recall {r['recall']:.4f}  F1 {r['f1']:.4f}")


# ---------------------------------------------------------------- results table
def result_row(r):
    return [r["category"], fmt(r.get("image_AUROC")), fmt(r.get("pixel_AUROC")), fmt(r.get("PRO"))]


def write_results(save_path, results):
    """Merge this run's rows into <save_path>/results.csv (rows of other categories are kept),
    recompute the mean, write atomically, and print the table (pixel cells of a category without
    masks: empty in the file, "no masks" on screen)."""
    path = os.path.join(save_path, "results.csv")
    rows = {}
    if os.path.isfile(path):
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if row and row[0] not in ("category", "mean") and len(row) == len(RESULT_HEADER):
                    rows[row[0]] = row
    for r in results:
        if r.get("image_AUROC") is not None or r.get("pixel_AUROC") is not None:
            rows[r["category"]] = result_row(r)
    body = [rows[c] for c in sorted(rows)]
    if len(body) > 1:
        mean = ["mean"]
        for col in range(1, len(RESULT_HEADER)):
            vals = [float(r[col]) for r in body if r[col] != ""]
            mean.append(fmt(float(np.mean(vals))) if len(vals) == len(body) else "")
        body.append(mean)
    if not body:
        return None
    write_csv_atomic(path, RESULT_HEADER, body)
    no_masks = {r["category"] for r in results if r.get("no_masks")}
    print(format_table(RESULT_HEADER, [row[:2] + [c or "no masks" for c in row[2:]] if row[0] in no_masks
                                       else row for row in body]))
    print(f"results: {path}")
    return path


def write_category_metrics(save_path, result):
    """Full per-category record (thresholds, reports, timing, raw scores) for tools and reports."""
    record = {k: v for k, v in result.items() if k != "arrays"}
    write_text_atomic(os.path.join(save_path, "metrics", f"{result['category']}.json"), dumps_json(record))


def run_categories(args, work, title):
    """Run `work(args, category)` over the selected categories. A failing category is reported
    and skipped; the finished ones keep their models and rows. Exit code 1 if any failed.
    With --report, the report package takes each category as it finishes and swaps the report in at the end."""
    if not getattr(args, "report", False):
        return run_each_category(args, work, title)
    with report.ReportBuilder(args.save_path, args.data_path, progress=not args.no_progress) as builder:
        code = run_each_category(args, work, title, on_result=builder.add)
        if builder.categories:
            builder.finish()
    return code


def run_each_category(args, work, title, on_result=None):
    dataset = open_dataset(args)
    categories = dataset.categories(args.category)
    plan = scaleout.plan_categories(args, dataset, categories, title)  # a plain run: all, as before
    results, failed = [], []
    for category in plan.categories:
        if plan.writes:
            print(f"[{title}] {category}")
        try:
            with plan.working_on(category):
                result = work(args, category)
        except UserError as err:
            if len(categories) == 1 and plan.alone:
                raise  # one category: its error is the run's one line
            print(f"error: {plan.where(category)}: {err}", file=sys.stderr)
            failed.append(category)
            continue
        results.append(result)
        if not plan.writes:
            continue
        if "image_AUROC" in result and result["image_AUROC"] is None:
            print("  image AUROC: none (the test set holds one class only); thresholds from its normal images")
        elif "image_AUROC" in result:
            pixel = "no masks" if result.get("no_masks") else fmt(result["pixel_AUROC"])
            print(f"  image AUROC {fmt(result['image_AUROC'])}  pixel AUROC {pixel}"
                  + (f"  PRO {fmt(result['PRO'])}" if result.get("PRO") is not None else ""))
            print_reports(result)
        write_category_metrics(args.save_path, result)
        if plan.group.rank == 0:  # worker 0's rows as they finish; the others' once gathered
            write_results(args.save_path, results)
        if on_result:
            on_result(result)
        result.pop("arrays", None)  # only the report needs them; memory stays flat over categories
    if not plan.alone:  # worker 0 writes every worker's rows, once
        return plan.finish(results, failed, len(categories), lambda rows: write_results(args.save_path, rows))
    if failed:
        print(f"error: {len(failed)} of {len(categories)} categories failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- evaluation of a saved model
def load_detector(args, category):
    path = model_path_for(args, category)
    state = load_model(path)
    check_model_matches(state, method_config(args), path)
    method = build_method(runtime_config(state["config"], args))
    engine = make_engine(method.feature_net(state), Preprocess.from_config(state["config"]).input_shape,
                         **engine_kwargs(args))
    return state, detector_for(state, engine, method), path


def eval_category(args, category):
    state, detector, path = load_detector(args, category)
    keeps_stored = getattr(args, "report", False) and not args.update_thresholds
    if keeps_stored and not state.get("calibration"):
        raise UserError(f"{path} has no stored thresholds, which --report shows; evaluate with "
                        f"--update_thresholds True (the default) or train with --eval or --calib_ratio > 0")
    # The model's own preprocessing and, in folder mode, its own test split, whatever flags were given.
    dataset = open_dataset(args, state.get("split"))
    result = evaluate_category(args, category, detector, Preprocess.from_config(state["config"]), dataset)
    if result is None:  # a worker that scored its share; worker 0 writes
        return {"category": category}
    if dataset.split is not None:
        result["split"] = dataset.split
    if args.update_thresholds:
        state["calibration"] = result["calibration"]
        save_model(path, state)
        print(f"  stored F1-optimal thresholds in {path}")
    elif keeps_stored:
        report.apply_thresholds(result, state["calibration"])  # the report shows what predict.py outputs
    result["config"] = state["config"]
    return result


# ---------------------------------------------------------------- prediction
def predict_images(args, paths):
    """Calibrated prediction per image; writes map (.npy), mask (.png) and overlay figure."""
    if args.category is None:
        raise UserError("--category is required (it selects <model_path>/<category>.pdparams)")
    state, detector, model_path = load_detector(args, args.category)
    if not state.get("calibration"):
        raise UserError(f"{model_path} has no calibrated thresholds; run eval.py on it first")
    preprocess = Preprocess.from_config(state["config"])
    records = []
    stems = visualize.output_stems(paths)
    for path in tqdm(paths, desc="predict", unit="img", disable=args.no_progress or len(paths) < 2, leave=False):
        chw, rgb = preprocess.load(path)
        pred = detector.predict(chw[None])[0]
        records.append(visualize.write_prediction(args.output_dir, path, stems[path], rgb, pred, args.save_pic, args.overwrite))
    return records


def parser_with(*adders, description=None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in adders:
        add(parser)
    return parser
