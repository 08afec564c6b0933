"""ReportBuilder: the report of one evaluation run, built a category at a time."""
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from report.metrics import classification_report
from models.postprocess import normalize

from .files import LABEL_NAMES, OUTCOMES, outcome_of, write_image_files
from .page import render_report
from .plots import write_plots


def add_report_args(parser):
    parser.add_argument("--report", action="store_true",
                        help="write <save_path>/report/index.html: metrics, curves and a filterable gallery "
                             "of every test image, plus report/predictions.json (implies --eval_PRO)")


def report_dir(save_path):
    return os.path.join(save_path, "report")


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
    """Takes one category at a time (so its arrays can be freed) and writes into a temporary
    folder beside <save_path>/report; finish() swaps that in whole, so a failed or interrupted
    run leaves the previous report untouched."""

    def __init__(self, save_path, data_root, progress=True, workers=2):
        os.makedirs(save_path, exist_ok=True)
        self.target = report_dir(save_path)
        self.run_name = os.path.basename(os.path.abspath(save_path))
        self.data_root = data_root
        self.progress = progress
        self.workers = workers
        self.tmp = tempfile.mkdtemp(prefix=".report.", dir=save_path)
        os.chmod(self.tmp, 0o755)  # mkdtemp's 0700 would make the report private once renamed
        self.categories = []      # {"name", "config", "row", "plots", "no_masks"}
        self.records = []         # predictions.json, also what the gallery cards show
        self.seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()

    def discard(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, result):
        t0 = time.perf_counter()
        a, c, category = result["arrays"], result["calibration"], result["category"]
        if a.get("rgbs") is None:
            raise ValueError("evaluation ran without the report flag: no test images kept")
        no_masks = bool(result.get("no_masks"))
        for kind in ("plots", "images", "heat", "maps", "masks"):
            os.makedirs(os.path.join(self.tmp, kind, category), exist_ok=True)
        self.categories.append({"name": category, "config": result.get("config") or {}, "no_masks": no_masks,
                                "row": metric_row(result), "plots": write_plots(self.tmp, category, result)})
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

    def finish(self):
        """Write the page and predictions.json, then swap the folder in for <save_path>/report."""
        t0 = time.perf_counter()
        with open(os.path.join(self.tmp, "predictions.json"), "w", encoding="utf-8") as f:
            json.dump(self.records, f, indent=1)
        with open(os.path.join(self.tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(render_report(self.run_name, os.path.basename(os.path.abspath(self.data_root)),
                                  self.categories, self.records))
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
