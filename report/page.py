"""The report's HTML page. Its style and script are real files beside this module (page.css,
gallery.js), inlined when the page is written so that the report folder needs nothing else."""
import datetime
import hashlib
import html
import json
import os
import platform
from importlib import metadata
from urllib.parse import quote

import numpy as np

from utils import fmt

from .files import JET, LABEL_NAMES, MAP_BITS, OUTCOMES
from .review import MARKS, REVIEW_FORMAT

STATIC_DIR = os.path.dirname(os.path.abspath(__file__))
PANELS = (("image", "image + ground truth"), ("heat_map", "heat map (0.5 = threshold)"),
          ("pred_mask", "predicted mask"))
LIBRARIES = ("paddlepaddle", "paddlepaddle-gpu", "numpy", "scipy", "scikit-learn", "scikit-image",
             "opencv-python-headless", "opencv-python", "pillow", "matplotlib")
MARK_TITLES = {"good": "a normal part the model flagged (false alarm): key g",
               "defect": "a defective part the model passed (miss): key d"}
NO_MASKS = "no masks"                               # shown instead of a metric that needs masks
MASK_METRICS = ("pixel_AUROC", "PRO", "pixel_F1")   # blank for a category without masks


def static_text(name):
    with open(os.path.join(STATIC_DIR, name), encoding="utf-8") as f:
        return f.read()


def esc(value):
    return html.escape(str(value), quote=True)


def url(rel_path):
    return esc(quote(rel_path))


def render_page(title, body, script=None):
    """A whole page with page.css inline; `script`: name of a static script to inline."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>\n{static_text('page.css')}</style></head>\n<body>\n{body}\n"
            + (f"<script>\n{static_text(script)}</script>\n" if script else "") + "</body></html>\n")


def html_table(header, rows, row_classes=None, cell_cols=None):
    """Rows of already-escaped cell HTML; `cell_cols` names cells (data-col) for tools and tests."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{row_classes[n]}"' if row_classes and row_classes[n] else ""
        cells = "".join(f'<td data-col="{esc(cell_cols[i])}">{c}</td>' if cell_cols else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def library_versions():
    found = {"python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def run_config(run_name, data_name, categories):
    """What produced the report: model settings (joined where categories differ), data, versions."""
    config = {"run": run_name, "data": data_name}
    keys = [k for cat in categories for k in cat["config"]]
    for key in dict.fromkeys(keys):
        values = dict.fromkeys(str(cat["config"].get(key, "")) for cat in categories)
        config["weights" if key == "backbone_weights" else key] = ", ".join(values)
    versions = model_versions(categories)
    if versions:
        config["model version"] = ", ".join(v if len(categories) == 1 else f"{name} {v}"
                                            for name, v in versions.items())
    config["date"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    config.update(library_versions())
    return config


def model_versions(categories):
    """{category: version id (and the id it was updated from)} of the categories that have one."""
    out = {}
    for cat in categories:
        v = cat.get("version")
        if v:
            out[cat["name"]] = v["id"] + (f" (from {v['parent']})" if v.get("parent") else "")
    return out


def review_key(run_name, categories, records):
    """Where the page keeps its marks (localStorage): the models' versions and a hash of the run
    and its images, so that a page made again over the same images by the same model finds them
    and another page does not."""
    ids = "+".join(cat["version"]["id"] for cat in categories if cat.get("version")) or "unversioned"
    digest = hashlib.sha256(json.dumps([run_name, [r["image_path"] for r in records]]).encode()).hexdigest()
    return f"anomaly-review/{ids}/{digest[:12]}"


METRIC_COLUMNS = (("image_AUROC", "image AUROC", 4), ("pixel_AUROC", "pixel AUROC", 4), ("PRO", "PRO", 4),
                  ("image_threshold", "image threshold", 4), ("precision", "precision", 4),
                  ("recall", "recall", 4), ("F1", "F1", 4), ("TP", "TP", None), ("FP", "FP", None),
                  ("FN", "FN", None), ("TN", "TN", None), ("pixel_threshold", "pixel threshold", 4),
                  ("pixel_F1", "pixel F1", 4))


def summary_row(rows):
    """Rates and areas: mean over categories (blank if one lacks it); counts: totals; thresholds
    are per category and have no meaningful mean."""
    out = {}
    for key, _, digits in METRIC_COLUMNS:
        values = [r[key] for r in rows]
        if digits is None:
            out[key] = sum(values)
        elif "threshold" not in key and all(v is not None for v in values):
            out[key] = float(np.mean(values))
        else:
            out[key] = None
    return out


def metrics_table(categories):
    def cells(row, no_masks=False):
        return [esc(NO_MASKS if no_masks and k in MASK_METRICS else row[k] if digits is None else fmt(row[k], digits))
                for k, _, digits in METRIC_COLUMNS]

    rows = [[esc(cat["name"])] + cells(cat["row"], cat.get("no_masks")) for cat in categories]
    none_has_masks = all(cat.get("no_masks") for cat in categories)
    rows.append(["mean / total"] + cells(summary_row([cat["row"] for cat in categories]), none_has_masks))
    return html_table(["category"] + [name for _, name, _ in METRIC_COLUMNS], rows,
                      row_classes=[""] * len(categories) + ["total"],
                      cell_cols=["category"] + [k for k, _, _ in METRIC_COLUMNS])


def render_plots(cat):
    """A category's plots; the PRO plot of a category without masks is a short note."""
    return "".join(f'<img loading="lazy" src="{url(path)}" alt="{esc(cat["name"])} {kind}">' if path else
                   f'<p class="muted">{esc(cat["name"])}: {NO_MASKS}, so no {esc(kind.upper())} curve</p>'
                   for kind, path in cat["plots"].items())


def render_card(r, order, no_masks=False, version=None):
    """One gallery card; an evaluated image shows its outcome and true label, a predicted one
    (predict.py / infer.py --report) its predicted label only."""
    panels = ((key, "image" if no_masks and key == "image" else alt) for key, alt in PANELS)
    images = "".join(f'<img loading="lazy" decoding="async" src="{url(r[key])}" '
                     f'data-full="{url(r.get(key + "_full", r[key]))}" alt="{esc(alt)}">'
                     for key, alt in panels)
    labelled = "outcome" in r
    data = {"path": r["image_path"], "order": order, "category": r["category"], "score": f'{r["pred_score"]:.6f}',
            "pred": r["pred_label"], "version": version or "", "mark": "none"}
    if labelled:
        data.update(defect=r["defect_type"], outcome=r["outcome"])
        verdict = (f'<span class="o {r["outcome"]}">{r["outcome"]}</span> predicted {r["pred_label"]}, '
                   f'true {esc(r["label"])}<br>{esc(r["defect_type"])} \u00b7 ')
    else:
        verdict = f'<span class="o {r["pred_label"]}">{r["pred_label"]}</span><br>'
    attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in data.items())
    marks = "".join(f'<button type="button" class="mark" data-set="{m}" title="{MARK_TITLES[m]}">{m}</button>'
                    for m in MARKS)
    return (f'<div class="card" tabindex="0"{attrs}><div class="imgs">{images}</div>'
            f'<div class="meta"><b>{r["pred_score"]:.3f}</b> {verdict}{esc(r["image_path"])}'
            f'<span class="marks">{marks}</span></div></div>')


def options(label, element_id, values):
    opts = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
    return f'<label>{label} <select id="{element_id}"><option value="">all</option>{opts}</select></label>'


def render_report(run_name, data_name, categories, records):
    """The report of an evaluation (metrics, curves, outcomes) or, when the categories carry no
    metrics (predict.py / infer.py --report), the review page of unlabelled predictions: the same
    gallery, sorted by score, filtered by predicted label."""
    labelled = all(cat.get("row") is not None for cat in categories)
    config = run_config(run_name, data_name, categories)
    gradient = ",".join(f"rgb({r},{g},{b})" for r, g, b in JET[::32].tolist() + [JET[-1].tolist()])
    scale = f'<span class="scale" style="background:linear-gradient(to right,{gradient})"></span>'
    no_masks = [cat["name"] for cat in categories if cat.get("no_masks")]
    versions = {cat["name"]: cat["version"]["id"] for cat in categories if cat.get("version")}
    if labelled:
        title, intro = f"Anomaly detection report: {run_name}", labelled_intro(categories, no_masks, scale)
        filters = (f'{options("defect type", "filter-defect", sorted({r["defect_type"] for r in records}))}\n'
                   f'{options("outcome", "filter-outcome", OUTCOMES)}')
        cards = list(enumerate(records))
    else:
        title = f"Review of predictions: {run_name}"
        intro = (f'<p class="muted">{len(records)} images predicted by the model, no labels: sorted by score, high '
                 f'first. Scores are calibrated: 0.5 is the image threshold. Heat maps share one scale with the pixel '
                 f'threshold at the middle: {scale} <code>predictions.json</code> lists every image with its '
                 f'files.</p></header>')
        filters = ""
        cards = sorted(enumerate(records), key=lambda nr: -nr[1]["pred_score"])  # stable: input order among ties
    orders = (("score:desc", "score, high first"), ("score:asc", "score, low first"),
              ("order:asc", "dataset order" if labelled else "input order"))
    orders = orders[2:] + orders[:2] if labelled else orders  # the first is the order the cards come in
    sort = ('<label>sort <select id="sort">' + "".join(f'<option value="{v}">{name}</option>' for v, name in orders)
            + "</select></label>")
    review = review_bar(run_name, categories, records, labelled, versions)
    body = f"""<header><h1>{esc(title)}</h1>
<div class="config">{"".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in config.items())}</div>
{intro}
<div class="controls">{options("category", "filter-category", [c["name"] for c in categories])}
{filters}{options("predicted", "filter-pred", LABEL_NAMES)}
{options("mark", "filter-mark", MARKS + ("none",))}{sort}<span id="shown" class="muted"></span>
{review}</div>
<div id="gallery">
{chr(10).join(render_card(r, n, r["category"] in no_masks, versions.get(r["category"]))
             for n, r in cards)}
</div>
<div id="viewer" hidden><div class="imgs"></div><div class="caption"></div>
<div class="muted">click or Esc to close</div></div>"""
    return render_page(f"{'Report' if labelled else 'Review'} {run_name}", body, "gallery.js")


def review_bar(run_name, categories, records, labelled, versions):
    """The marks' counter, download and load buttons; its data-* say what review.json records (gallery.js)."""
    single = next(iter(versions.values())) if len(set(versions.values())) == 1 else ""
    return (f'<div id="review" data-key="{esc(review_key(run_name, categories, records))}" '
            f'data-format="{REVIEW_FORMAT}" data-report="{esc(run_name)}" '
            f'data-paths="{"data_path" if labelled else ""}" data-version="{esc(single)}">'
            f'<span id="marked" class="muted"></span> <button type="button" id="download">download review.json</button> '
            f'<button type="button" id="load-open">load review.json</button>'
            f'<input type="file" id="load" accept=".json,application/json" hidden> <span id="loaded" class="muted"></span> '
            f'<span class="muted">mark: click <b>good</b> (a false alarm) or <b>defect</b> (a miss), or keys '
            f'<kbd>j</kbd>/<kbd>k</kbd> move, <kbd>g</kbd> good, <kbd>d</kbd> defect, <kbd>u</kbd> unmark</span></div>')


def labelled_intro(categories, no_masks, scale):
    plots = "".join(f'<h2>{esc(cat["name"])}</h2><div class="plots">{render_plots(cat)}</div>' for cat in categories)
    no_masks_note = (f" {esc(', '.join(no_masks))}: {NO_MASKS} (image labels only), so no outlines, "
                     f"pixel AUROC, PRO or pixel F1; the pixel threshold follows the image threshold (the same "
                     f"cut on each image's map maximum), so the predicted mask shows where a flagged image's map "
                     f"is highest." if no_masks else "")
    return f"""<h2>Metrics</h2>{metrics_table(categories)}
<p class="muted">Image metrics at the image threshold; rates in the last row are means over categories,
counts are totals. Scores in the gallery are calibrated: 0.5 is the image threshold.
Heat maps share one scale per category with the pixel threshold at the middle:
{scale}
Ground truth is outlined in magenta.{no_masks_note} <code>predictions.json</code> lists every image with its files;
<code>maps/</code> hold 16-bit PNGs (value / 65535 = calibrated score, {MAP_BITS}-bit precision),
<code>masks/</code> the predicted masks.</p></header>
<details open><summary>Curves per category</summary><section>{plots}</section></details>"""
