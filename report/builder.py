"""ReportBuilder: the report of one evaluation run, built a category at a time, or the review
page of predict.py / infer.py --report, built an image at a time."""
import contextlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from report.metrics import classification_report
from models.postprocess import normalize, prediction_fields

from .files import LABEL_NAMES, OUTCOMES, outcome_of, write_calibrated_files, write_image_files
from .page import render_report
from .plots import write_plots
from utils import refuse_overwrite


def add_report_args(parser):
    parser.add_argument("--report", action="store_true",
                        help="write <save_path>/report/index.html: metrics, curves and a filterable gallery "
                             "of every test image, plus report/predictions.json (implies --eval_PRO)")


def add_review_args(parser, out_dir):
    """predict.py / infer.py --report; `out_dir` names the flag the page goes under."""
    parser.add_argument("--report", action="store_true",
                        help=f"also write {out_dir}/report/index.html: the review page of these images (gallery "
                             f"sorted by score, heat maps, marks good/defect that download as review.json for "
                             f"train.py --update --from_review)")


def report_dir(save_path):
    return os.path.join(save_path, "report")


def review_page(out_dir, enabled, overwrite, data_name):
    """predict.py / infer.py --report: a ReportBuilder for <out_dir>/report (a context that
    discards an unfinished page), or a context of None without the flag. An earlier page there
    is kept unless --overwrite, like the prediction files beside it."""
    if not enabled:
        return contextlib.nullcontext()
    refuse_overwrite([report_dir(out_dir)], overwrite)
    return ReportBuilder(out_dir, progress=False, data_name=data_name)


def apply_thresholds(result, calibration):
    """Make an evaluation result describe `calibration` (a model's stored thresholds) instead of
    the test-set optimum it was scored with: counts and precision/recall are recomputed. A
    category without masks has no pixel counts to recompute."""
    a = result["arrays"]
    result["calibration"] = calibration
    result["image_report"] = classification_report(a["labels"], a["scores"], calibration["image_threshold"])
    result["pixel_report"] = (None if result.get("no_masks") else
                              classification_report(a["masks"], a["maps"], calibration["pixel_threshold"]))
    return result


def metric_row(result):
    """The metrics table's row of a category; pixel F1 is None without masks (the pixel threshold
    is still shown: it follows the image threshold)."""
    rep = result["image_report"]
    pix = None if result.get("no_masks") else result["pixel_report"]  # counted against all-zero masks
    return {"image_AUROC": result.get("image_AUROC"), "pixel_AUROC": result.get("pixel_AUROC"),
            "PRO": result.get("PRO"), "image_threshold": rep["threshold"], "precision": rep["precision"],
            "recall": rep["recall"], "F1": rep["f1"], **{k: rep[k] for k in OUTCOMES},
            "pixel_threshold": pix["threshold"] if pix else result["calibration"]["pixel_threshold"],
            "pixel_F1": pix["f1"] if pix else None}


class ReportBuilder:
    """Takes one evaluated category at a time (so its arrays can be freed), or one predicted
    image at a time (add_prediction: a line's folder may be long), and writes into a temporary
    folder beside <save_path>/report; finish() swaps that in whole, so a failed or interrupted
    run leaves the previous report untouched.

    `data_root`: evaluation images are named relative to it (the page stays portable);
    predictions keep their paths as given on the command line and `data_name` says what they were."""

    def __init__(self, save_path, data_root=None, progress=True, workers=2, data_name=None):
        os.makedirs(save_path, exist_ok=True)
        self.target = report_dir(save_path)
        self.run_name = os.path.basename(os.path.abspath(save_path))
        self.data_root = data_root
        self.data_name = data_name or os.path.basename(os.path.abspath(data_root or "."))
        self.progress = progress
        self.workers = workers
        self.tmp = tempfile.mkdtemp(prefix=".report.", dir=save_path)
        os.chmod(self.tmp, 0o755)  # mkdtemp's 0700 would make the report private once renamed
        self.categories = []      # {"name", "config", "version", "row", "plots", "no_masks"}
        self.records = []         # predictions.json, also what the gallery cards show
        self.kind = None          # "evaluation" (labelled) or "predictions": one page is one kind
        self.seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()

    def discard(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self, kind, category, config, version, **extra):
        if self.kind not in (None, kind):
            raise ValueError(f"a report holds evaluations or predictions, not both ({self.kind} then {kind})")
        self.kind = kind
        for folder in ("images", "heat", "maps", "masks") + (("plots",) if kind == "evaluation" else ()):
            os.makedirs(os.path.join(self.tmp, folder, category), exist_ok=True)
        self.categories.append({"name": category, "config": config or {}, "version": version, **extra})
        return self.categories[-1]

    def add(self, result):
        t0 = time.perf_counter()
        a, c, category = result["arrays"], result["calibration"], result["category"]
        if a.get("rgbs") is None:
            raise ValueError("evaluation ran without the report flag: no test images kept")
        no_masks = bool(result.get("no_masks"))
        entry = self._start("evaluation", category, result.get("config"), result.get("version"), no_masks=no_masks,
                            row=metric_row(result))
        entry["plots"] = write_plots(self.tmp, category, result)
        pred_scores = normalize(a["scores"], c["image_threshold"], c["image_min"], c["image_max"])
        stems = [f"{category}/{p['defect_type']}_{os.path.splitext(os.path.basename(p['image_path']))[0]}"
                 for p in result["predictions"]]

        def write(i):
            return write_image_files(self.tmp, stems[i], a["rgbs"][i], a["maps"][i],
                                     None if no_masks else a["masks"][i], c)

        with ThreadPoolExecutor(self.workers) as pool:  # PIL and cv2 encoders release the GIL
            files = list(tqdm(pool.map(write, range(len(stems))), total=len(stems), unit="img",
                              desc=f"report {category}", disable=not self.progress, leave=False))
        for p, score, pred_score, f in zip(result["predictions"], a["scores"], pred_scores, files):
            pred = bool(score >= c["image_threshold"])
            self.records.append({
                "image_path": os.path.relpath(p["image_path"], self.data_root).replace(os.sep, "/"),
                "category": category, "defect_type": p["defect_type"], "label": LABEL_NAMES[p["label"]],
                "pred_score": round(float(pred_score), 6), "pred_label": LABEL_NAMES[pred],
                "raw_score": round(float(score), 6), "outcome": outcome_of(p["label"], pred), **f})
        self.seconds += time.perf_counter() - t0

    def add_prediction(self, category, image_path, stem, rgb, pred, config=None, version=None):
        """One image of predict.py / infer.py --report: `pred` is the calibrated prediction they
        print (Detector.calibrated), `image_path` as given on the command line. No label, so no
        metrics; the files are written now and only the record is kept."""
        t0 = time.perf_counter()
        if category not in {cat["name"] for cat in self.categories}:
            self._start("predictions", category, config, version)
        files = write_calibrated_files(self.tmp, f"{category}/{stem}", rgb, pred["anomaly_map"], pred["pred_mask"])
        self.records.append({"image_path": image_path, "category": category, **prediction_fields(pred), **files})
        self.seconds += time.perf_counter() - t0

    def finish(self):
        """Write the page and predictions.json, then swap the folder in for <save_path>/report."""
        t0 = time.perf_counter()
        with open(os.path.join(self.tmp, "predictions.json"), "w", encoding="utf-8") as f:
            json.dump(self.records, f, indent=1)
        with open(os.path.join(self.tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(render_report(self.run_name, self.data_name, self.categories, self.records))
        replace_dir(self.tmp, self.target)
        self.seconds += time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(self.target) for n in names)
        print(f"report: {os.path.join(self.target, 'index.html')}  ({len(self.records)} images, "
              f"{size / 2 ** 20:.1f} MB, {self.seconds:.1f} s)")
        return self.target


def replace_dir(src, dst):
    """Put folder `src` at `dst`. The old `dst` is renamed aside first and deleted after, so `dst`
    is never a mix of two reports (Linux has no portable atomic swap of two folders)."""
    aside = src + ".old"
    if os.path.exists(dst):
        os.rename(dst, aside)
    try:
        os.rename(src, dst)
    except OSError:
        if os.path.exists(aside):
            os.rename(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)
