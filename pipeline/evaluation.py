"""Scoring a test set (metrics, thresholds, pictures), evaluating and predicting with a saved
model: what eval.py and predict.py run, and train.py after a fit."""
import os
import time

import numpy as np
from tqdm import tqdm

from report import metrics
import report
from pipeline import scaleout
from report import visualize
from pipeline.cli import engine_kwargs, method_config, model_path_for, runtime_config
from datasets import iterate_batches, open_dataset
from datasets.mvtec import has_masks
from datasets.transforms import Preprocess
from models import build_method, check_model_matches, load_model, precision, save_model
from models.backbone import make_engine
from models.postprocess import Detector, normalize
from models.version import version_of
from utils import UserError


def detector_for(state, engine, method):
    preprocess = Preprocess.from_config(state["config"])
    return Detector.for_method(method, engine, state["stats"], preprocess.map_size, state.get("calibration"),
                               tiles=preprocess.tiles)


def normal_calibration(scores, maps, count):
    """Thresholds from normal images only: the largest score seen, so every held-out normal
    image and pixel is at most the threshold."""
    top = float(maps.max())
    calib = {"image_threshold": float(scores.max()), "pixel_threshold": top,
             "image_min": float(scores.min()), "image_max": float(scores.max()),
             "pixel_min": float(maps.min()), "pixel_max": top,
             "source": f"max over {count} held-out normal training images"}
    calib["validation"] = validation_answers(scores, np.zeros(len(scores), np.int64), calib)
    return calib


def validation_answers(scores, labels, calib):
    """What the model answers on the images its thresholds were set on, as the service counts
    its answers (Detector.calibrated): the share called anomalous, over all of them and over the
    good ones, and the good ones' median calibrated score. The service shows its own share
    beside these (GET /models, /metrics): a line drifting away from them shows there first."""
    scores, good = np.asarray(scores, np.float32), np.asarray(labels) == 0
    anomalous = scores >= calib["image_threshold"]
    calibrated = normalize(scores, calib["image_threshold"], calib["image_min"], calib["image_max"])
    return {"images": int(len(scores)), "anomalous_share": float(anomalous.mean()),
            "good_images": int(good.sum()),
            "good_anomalous_share": float(anomalous[good].mean()) if good.any() else None,
            "good_score_median": float(np.median(calibrated[good])) if good.any() else None}


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
        if no_masks:
            # The pixel threshold follows the image threshold: the same F1-optimal cut, made on
            # each image's map maximum. Where the image score is that maximum (all but PatchCore)
            # the two are equal, so an image flagged anomalous always shows where in its mask.
            # (Above every normal pixel instead, most flagged images showed an empty mask.)
            calib["pixel_threshold"] = metrics.f1_optimal_threshold(labels, maps.reshape(n, -1).max(axis=1))
            calib["source"] = (f"image threshold F1-optimal on the {n} test images of {category}; no masks: "
                               f"pixel threshold the same on their map maxima")
        else:
            calib["pixel_threshold"] = metrics.f1_optimal_threshold(masks, maps)
        calib["validation"] = validation_answers(scores, labels, calib)
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


def load_detector(args, category):
    path = model_path_for(args, category)
    state = load_model(path)
    check_model_matches(state, method_config(args), path)
    method = build_method(runtime_config(state["config"], args))
    run_at = precision.for_model(args.precision, state["config"], args.use_gpu)
    engine = make_engine(method.feature_net(state), Preprocess.from_config(state["config"]).input_shape,
                         **engine_kwargs(args, run_at))
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
    own = precision.recorded(state["config"])
    if args.update_thresholds and args.precision is not None and precision.resolve(args.precision, args.use_gpu) != own:
        print(f"  thresholds not stored in {path}: they were found at --precision {args.precision}, "
              f"the model scores at {own}")
    elif args.update_thresholds:
        state["calibration"] = result["calibration"]
        save_model(path, state)
        print(f"  stored F1-optimal thresholds in {path}")
    elif keeps_stored:
        report.apply_thresholds(result, state["calibration"])  # the report shows what predict.py outputs
    result["config"] = state["config"]
    return with_version(result, state)


def with_version(result, state):
    """The model version a result was made with, into its metrics file (metrics/<category>.json)."""
    result["version"] = version_of(state)
    result["model_version"] = result["version"]["id"]
    return result


# ---------------------------------------------------------------- prediction
def predict_images(args, paths, unreadable):
    """Calibrated prediction per image; writes map (.npy), mask (.png) and overlay figure; with
    --report also the review page <output_dir>/report/index.html. Files that cannot be read are
    named and skipped (`unreadable`: datasets.unreadable.UnreadableImages)."""
    if args.category is None:
        raise UserError("--category is required (it selects <model_path>/<category>.pdparams)")
    state, detector, model_path = load_detector(args, args.category)
    if not state.get("calibration"):
        raise UserError(f"{model_path} has no calibrated thresholds; run eval.py on it first")
    preprocess = Preprocess.from_config(state["config"])
    version = version_of(state)
    records = []
    stems = visualize.output_stems(paths)
    with report.review_page(args.output_dir, args.report, args.overwrite, ", ".join(args.inputs)) as page:
        for path in tqdm(paths, desc="predict", unit="img", disable=args.no_progress or len(paths) < 2, leave=False):
            loaded = unreadable.load(preprocess, path)
            if loaded is None:
                continue
            chw, rgb = loaded
            pred = detector.predict(chw[None])[0]
            records.append(visualize.write_prediction(args.output_dir, path, stems[path], rgb, pred, args.save_pic,
                                                      args.overwrite, version["id"]))
            if page:
                page.add_prediction(args.category, path, stems[path], rgb, pred, state["config"], version)
        if page:
            page.finish()
    return records
