"""A run's results: the columns of results.csv, the default name of its folder, the table and the
per-category metrics files. They live below the evaluation and the report package, which both
use them, so neither imports the other."""
import csv
import os

import numpy as np

from utils import dumps_json, fmt, format_table, write_csv_atomic, write_text_atomic

RESULT_HEADER = ["category", "image_AUROC", "pixel_AUROC", "PRO"]


def run_name(args):
    """Default output folder name: the method's defining flags. The input geometry is left out on
    purpose: eval.py, predict.py and export_model.py find a full-frame or tiled model with the
    method flags alone (the model file carries its geometry)."""
    if args.method == "coreset":
        return f"coreset_{args.arch}_r{args.coreset_ratio:g}"
    if args.method == "efficientad":
        return f"efficientad_{args.model_size}"
    return f"{args.method}_{args.arch}_k{args.k}"


def print_reports(result):
    for kind in ("image_report", "pixel_report"):
        r = result.get(kind)
        if r and kind == "pixel_report" and result.get("no_masks"):
            print(f"  segmentation (pixel): no masks; threshold {r['threshold']:.4f} (follows the image threshold)")
        elif r:
            name = "classification (image)" if kind == "image_report" else "segmentation (pixel)"
            print(f"  {name}: threshold {r['threshold']:.4f}  precision {r['precision']:.4f}  "
                  f"recall {r['recall']:.4f}  F1 {r['f1']:.4f}")


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
    if all(row[0] in no_masks for row in body if row[0] != "mean"):
        no_masks.add("mean")  # no category has masks: the mean's pixel cells read "no masks" too
    print(format_table(RESULT_HEADER, [row[:2] + [c or "no masks" for c in row[2:]] if row[0] in no_masks
                                       else row for row in body]))
    print(f"results: {path}")
    return path


def write_category_metrics(save_path, result):
    """Full per-category record (thresholds, reports, timing, raw scores) for tools and reports."""
    record = {k: v for k, v in result.items() if k != "arrays"}
    write_text_atomic(os.path.join(save_path, "metrics", f"{result['category']}.json"), dumps_json(record))
