"""train.py's work per category: fit, calibrate, optionally evaluate, write the model once."""
import os
import time

import numpy as np

from pipeline import scaleout
from pipeline.cli import engine_kwargs, method_config, model_path_for, runtime_config
from datasets import iterate_batches, open_dataset
from datasets.transforms import Preprocess
from datasets.verify import check_samples
from pipeline.evaluation import detector_for, evaluate_category, normal_calibration, with_version
from models import build_method, precision, save_model
from models.quantize import CALIBRATION_IMAGES, INT8_REFUSED
from models.padim_sums import save_sums
from utils import UserError, fmt, peak_rss_mb, set_seed


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


def train_category(args, category):
    """Fit one category, calibrate, optionally evaluate; the model file is written once, at the end."""
    set_seed(args.seed)
    # The statistics / memory bank are fitted on the features of the precision that will score.
    cfg = dict(method_config(args), precision=args.precision)
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
    kwargs = engine_kwargs(args, args.precision)
    if args.precision == "int8" and not args.use_gpu:  # calibrated on the same images by every worker
        first = image_batches(fit_samples[:CALIBRATION_IMAGES], args, preprocess)
        kwargs["calibration"] = np.concatenate(list(first()))
    state, engine = method.fit(image_batches(mine, args, preprocess), kwargs,
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
    return with_version(result, state)


def resolve_precision(args):
    """A new fit's --precision: None -> fp32, auto -> bf16 where native; one line where this CPU
    lacks it, or for int8 where the method's accuracy is not held (models/quantize.py). An --update
    adds features at the model's own precision (pipeline/updating.py)."""
    if not args.update:
        args.precision = precision.resolve(args.precision, args.use_gpu)
    if args.precision == "int8" and args.method in INT8_REFUSED and not args.use_gpu:
        raise UserError(INT8_REFUSED[args.method])


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
                   args.seed, engine_kwargs(args, args.precision), progress=not args.no_progress, resume=args.resume,
                   checkpoint_every=args.checkpoint_every, minutes=args.train_minutes)
    print(f"teacher: {out}  ({info['steps']} steps, {info['seconds'] / 60:.1f} min, loss {fmt(info['loss'])})")
    return 0
