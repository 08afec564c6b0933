"""The report's HTML page. Its style and script are real files beside this module (page.css,
gallery.js), inlined when the page is written so that the report folder needs nothing else."""
import datetime
import html
import os
import platform
from importlib import metadata
from urllib.parse import quote

import numpy as np

from utils import fmt

from .files import JET, MAP_BITS, OUTCOMES

STATIC_DIR = os.path.dirname(os.path.abspath(__file__))
PANELS = (("image", "image + ground truth"), ("heat_map", "heat map (0.5 = threshold)"),
          ("pred_mask", "predicted mask"))
LIBRARIES = ("paddlepaddle", "paddlepaddle-gpu", "numpy", "scipy", "scikit-learn", "scikit-image",
             "opencv-python-headless", "opencv-python", "pillow", "matplotlib")
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
    config["date"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    config.update(library_versions())
    return config


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


def render_card(r, no_masks=False):
    panels = ((key, "image" if no_masks and key == "image" else alt) for key, alt in PANELS)
    images = "".join(f'<img loading="lazy" decoding="async" src="{url(r[key])}" '
                     f'data-full="{url(r.get(key + "_full", r[key]))}" alt="{esc(alt)}">'
                     for key, alt in panels)
    return (f'<div class="card" tabindex="0" data-path="{esc(r["image_path"])}" data-category="{esc(r["category"])}" '
            f'data-defect="{esc(r["defect_type"])}" data-score="{r["pred_score"]:.6f}" data-outcome="{r["outcome"]}">'
            f'<div class="imgs">{images}</div><div class="meta"><b>{r["pred_score"]:.3f}</b> '
            f'<span class="o {r["outcome"]}">{r["outcome"]}</span> predicted {r["pred_label"]}, '
            f'true {r["label"]}<br>{esc(r["defect_type"])} \u00b7 {esc(r["image_path"])}</div></div>')


def options(label, element_id, values):
    opts = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
    return f'<label>{label} <select id="{element_id}"><option value="">all</option>{opts}</select></label>'


def render_report(run_name, data_name, categories, records):
    config = run_config(run_name, data_name, categories)
    gradient = ",".join(f"rgb({r},{g},{b})" for r, g, b in JET[::32].tolist() + [JET[-1].tolist()])
    plots = "".join(f'<h2>{esc(cat["name"])}</h2><div class="plots">{render_plots(cat)}</div>' for cat in categories)
    no_masks = [cat["name"] for cat in categories if cat.get("no_masks")]
    no_masks_note = (f" {esc(', '.join(no_masks))}: {NO_MASKS} (image labels only), so no outlines, "
                     f"pixel AUROC, PRO or pixel F1; the pixel threshold follows the image threshold (the same "
                     f"cut on each image's map maximum), so the predicted mask shows where a flagged image's map "
                     f"is highest." if no_masks else "")
    sort = ('<label>sort <select id="sort"><option value="path:asc">dataset order</option>'
            '<option value="score:desc">score, high first</option>'
            '<option value="score:asc">score, low first</option></select></label>')
    body = f"""<header><h1>Anomaly detection report: {esc(run_name)}</h1>
<div class="config">{"".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in config.items())}</div>
<h2>Metrics</h2>{metrics_table(categories)}
<p class="muted">Image metrics at the image threshold; rates in the last row are means over categories,
counts are totals. Scores in the gallery are calibrated: 0.5 is the image threshold.
Heat maps share one scale per category with the pixel threshold at the middle:
<span class="scale" style="background:linear-gradient(to right,{gradient})"></span>
Ground truth is outlined in magenta.{no_masks_note} <code>predictions.json</code> lists every image with its files;
<code>maps/</code> hold 16-bit PNGs (value / 65535 = calibrated score, {MAP_BITS}-bit precision),
<code>masks/</code> the predicted masks.</p></header>
<details open><summary>Curves per category</summary><section>{plots}</section></details>
<div class="controls">{options("category", "filter-category", [c["name"] for c in categories])}
{options("defect type", "filter-defect", sorted({r["defect_type"] for r in records}))}
{options("outcome", "filter-outcome", OUTCOMES)}{sort}<span id="shown" class="muted"></span></div>
<div id="gallery">
{chr(10).join(render_card(r, r["category"] in no_masks) for r in records)}
</div>
<div id="viewer" hidden><div class="imgs"></div><div class="caption"></div>
<div class="muted">click or Esc to close</div></div>"""
    return render_page(f"Report {run_name}", body, "gallery.js")
