"""Review report of an evaluation, and comparison of finished runs.

    python eval.py ... --report        -> <save_path>/report/index.html (+ images, predictions.json)
    python eval.py --compare RUN_DIR RUN_DIR [...] [--save_path OUT]

The report is one static page that opens from file:// (CSS and JS inline, nothing fetched) over
relative image files. Per test image it composites a few small JPEGs with numpy; matplotlib only
draws the three plots per category, so the report costs little next to the evaluation itself.
"""
import csv
import datetime
import html
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from urllib.parse import quote

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from metrics import PRO_FPR_LIMIT, classification_report  # noqa: E402
from models.postprocess import normalize  # noqa: E402
from utils import UserError, fmt, format_table, write_csv_atomic, write_text_atomic  # noqa: E402

THUMB_PX = 256                 # gallery images; larger crops also get a full-size copy for the viewer
JPEG_QUALITY = 85
MAP_BITS = 12                  # anomaly-map precision inside the 16-bit PNG: full 16 bits is ~70 KB
                               # of noise per map and would break the size budget on MVTec
GT_COLOR = (255, 0, 255)       # magenta: absent from both the jet scale and most product images
JET = (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint16)
LABEL_NAMES = ("normal", "anomalous")
OUTCOMES = ("TP", "FP", "FN", "TN")
PANELS = (("image", "image + ground truth"), ("heat_map", "heat map (0.5 = threshold)"),
          ("pred_mask", "predicted mask"))
LIBRARIES = ("paddlepaddle", "paddlepaddle-gpu", "numpy", "scipy", "scikit-learn", "scikit-image",
             "opencv-python-headless", "opencv-python", "pillow", "matplotlib")


def add_report_args(parser):
    parser.add_argument("--report", action="store_true",
                        help="write <save_path>/report/index.html: metrics, curves and a filterable gallery "
                             "of every test image, plus report/predictions.json (implies --eval_PRO)")


def report_dir(save_path):
    return os.path.join(save_path, "report")


def apply_thresholds(result, calibration):
    """Make an evaluation result describe `calibration` (a model's stored thresholds) instead of
    the test-set optimum it was scored with: counts and precision/recall are recomputed."""
    a = result["arrays"]
    result["calibration"] = calibration
    result["image_report"] = classification_report(a["labels"], a["scores"], calibration["image_threshold"])
    result["pixel_report"] = classification_report(a["masks"], a["maps"], calibration["pixel_threshold"])
    return result


# ---------------------------------------------------------------- per-image files
def outcome_of(label, pred):
    return ("TN", "FP", "FN", "TP")[2 * int(label) + int(pred)]


def gt_outline(mask):
    """Two-pixel ring on the ground-truth border (cv2 morphology: ~50x faster than skimage)."""
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0


def save_jpeg(root, rel, rgb):
    """Write the JPEG at `rel`; if larger than a thumbnail, that is the full-size copy and the
    thumbnail goes beside it. -> (thumbnail path, full-size path), both relative."""
    img = Image.fromarray(rgb)
    if max(img.size) <= THUMB_PX:
        img.save(os.path.join(root, rel), quality=JPEG_QUALITY)
        return rel, rel
    thumb_rel = rel[:-4] + "_thumb.jpg"
    img.save(os.path.join(root, rel), quality=JPEG_QUALITY)
    img.thumbnail((THUMB_PX, THUMB_PX), Image.BILINEAR)
    img.save(os.path.join(root, thumb_rel), quality=JPEG_QUALITY)
    return thumb_rel, rel


def save_map_png16(path, calibrated):
    """Calibrated map as 16-bit grey PNG: value / 65535 = calibrated score (0.5 = threshold)."""
    q = np.round(calibrated * (2 ** MAP_BITS - 1)).astype(np.uint16)
    # Bit replication widens the quantised value so that 1.0 maps exactly to 65535.
    if not cv2.imwrite(path, (q << (16 - MAP_BITS)) | (q >> (2 * MAP_BITS - 16)), [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"cannot write {path}")


def write_image_files(root, stem, rgb, raw_map, gt_mask, calibration):
    """Gallery pictures and prediction files of one test image. -> paths relative to `root`."""
    c = calibration
    calibrated = normalize(raw_map, c["pixel_threshold"], c["pixel_min"], c["pixel_max"])
    edge = gt_outline(gt_mask)
    image = rgb.copy()
    image[edge] = GT_COLOR
    heat = ((rgb.astype(np.uint16) + JET[(calibrated * 255 + 0.5).astype(np.uint8)]) >> 1).astype(np.uint8)
    heat[edge] = GT_COLOR
    files = {}
    files["image"], files["image_full"] = save_jpeg(root, f"images/{stem}.jpg", image)
    files["heat_map"], files["heat_map_full"] = save_jpeg(root, f"heat/{stem}.jpg", heat)
    files["anomaly_map"] = f"maps/{stem}.png"
    save_map_png16(os.path.join(root, files["anomaly_map"]), calibrated)
    files["pred_mask"] = f"masks/{stem}.png"
    Image.fromarray(raw_map >= c["pixel_threshold"]).save(os.path.join(root, files["pred_mask"]))
    return files


# ---------------------------------------------------------------- per-category plots
def save_plot(fig, path):
    fig.subplots_adjust(left=0.17, right=0.96, bottom=0.16, top=0.9)  # tight_layout costs a full draw
    fig.savefig(path, dpi=90)
    plt.close(fig)


def note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def thin_curve(x, y, points=800):
    """Millions of PRO points plot no sharper than a few hundred and take seconds to draw."""
    idx = np.unique(np.searchsorted(x, np.linspace(0.0, x[-1], points)).clip(0, len(x) - 1))
    return x[idx], y[idx]


def write_plots(root, category, result):
    a, c, rep = result["arrays"], result["calibration"], result["image_report"]
    scores, labels = a["scores"], a["labels"].astype(bool)
    both_classes = labels.any() and not labels.all()
    files = {kind: f"plots/{category}/{kind}.png" for kind in ("histogram", "roc", "pro")}

    fig, ax = plt.subplots(figsize=(4.2, 3))
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[~labels], bins, color="tab:green", alpha=0.6, label=f"good ({(~labels).sum()})")
    ax.hist(scores[labels], bins, color="tab:red", alpha=0.6, label=f"defective ({labels.sum()})")
    ax.axvline(c["image_threshold"], color="k", ls="--", lw=1, label=f"threshold {c['image_threshold']:.4g}")
    ax.set(title=f"{category}: image scores", xlabel="image score (raw)", ylabel="images")
    ax.legend(fontsize=7)
    save_plot(fig, os.path.join(root, files["histogram"]))

    fig, ax = plt.subplots(figsize=(3.4, 3))
    ax.plot([0, 1], [0, 1], color="0.8", lw=1)
    if both_classes:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="tab:blue", label=f"AUROC {fmt(result.get('image_AUROC'))}")
        ax.plot(rep["FP"] / max(rep["FP"] + rep["TN"], 1), rep["recall"], "o", color="k", label="threshold")
        ax.legend(fontsize=7, loc="lower right")
    else:
        note(ax, "one class only: no ROC")
    ax.set(title=f"{category}: image ROC", xlabel="false positive rate", ylabel="true positive rate",
           xlim=(0, 1), ylim=(0, 1.02))
    save_plot(fig, os.path.join(root, files["roc"]))

    fig, ax = plt.subplots(figsize=(3.4, 3))
    curve = a.get("pro_curve")
    if curve is not None:
        fpr, pro = thin_curve(*curve)
        ax.plot(fpr, pro, color="tab:purple", label=f"PRO {fmt(result.get('PRO'))} (FPR <= {PRO_FPR_LIMIT})")
        inside = fpr <= PRO_FPR_LIMIT
        ax.fill_between(fpr[inside], pro[inside], color="tab:purple", alpha=0.15)
        ax.axvline(PRO_FPR_LIMIT, color="0.5", ls=":", lw=1)
        ax.legend(fontsize=7, loc="lower right")
    else:
        note(ax, "no defect regions: no PRO")
    ax.set(title=f"{category}: per-region overlap", xlabel="false positive rate (pixels)", ylabel="PRO",
           xlim=(0, 1), ylim=(0, 1.02))
    save_plot(fig, os.path.join(root, files["pro"]))
    return files


def metric_row(result):
    rep, pix = result["image_report"], result["pixel_report"]
    return {"image_AUROC": result.get("image_AUROC"), "pixel_AUROC": result.get("pixel_AUROC"),
            "PRO": result.get("PRO"), "image_threshold": rep["threshold"], "precision": rep["precision"],
            "recall": rep["recall"], "F1": rep["f1"], **{k: rep[k] for k in OUTCOMES},
            "pixel_threshold": pix["threshold"], "pixel_F1": pix["f1"]}


# ---------------------------------------------------------------- builder
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
        self.categories = []      # {"name", "config", "row", "plots"}
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
        for kind in ("plots", "images", "heat", "maps", "masks"):
            os.makedirs(os.path.join(self.tmp, kind, category), exist_ok=True)
        self.categories.append({"name": category, "config": result.get("config") or {},
                                "row": metric_row(result), "plots": write_plots(self.tmp, category, result)})
        pred_scores = normalize(a["scores"], c["image_threshold"], c["image_min"], c["image_max"])
        stems = [f"{category}/{p['defect_type']}_{os.path.splitext(os.path.basename(p['image_path']))[0]}"
                 for p in result["predictions"]]

        def write(i):
            return write_image_files(self.tmp, stems[i], a["rgbs"][i], a["maps"][i], a["masks"][i], c)

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


# ---------------------------------------------------------------- HTML
PAGE_CSS = """
:root{--fg:#1d2330;--muted:#667085;--line:#d9dde4;--bg:#f5f6f8}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:var(--fg);background:var(--bg)}
header,section{padding:10px 20px}
h1{font-size:20px;margin:4px 0 10px}h2{font-size:16px;margin:14px 0 8px}
table{border-collapse:collapse;background:#fff;margin-bottom:8px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#eef0f4}th:first-child,td:first-child{text-align:left}
.config{display:flex;flex-wrap:wrap;gap:4px 8px;max-width:1100px}
.config span{background:#fff;border:1px solid var(--line);border-radius:4px;padding:1px 7px}
.config b{color:var(--muted);font-weight:500}
tr.total td{font-weight:600;background:#eef1f5}td.best,tr.total td.best{font-weight:700;background:#d4f0dc}
th[colspan]{text-align:center}
.muted{color:var(--muted)}summary{padding:4px 20px;font-weight:600;cursor:pointer}
.plots{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:8px}
.plots img{background:#fff;border:1px solid var(--line)}
.scale{display:inline-block;width:220px;height:10px;vertical-align:middle;border:1px solid var(--line);
 position:relative}.scale:after{content:"";position:absolute;left:50%;top:-3px;bottom:-3px;border-left:2px solid #000}
.controls{position:sticky;top:0;z-index:1;background:var(--bg);border-bottom:1px solid var(--line);
 display:flex;flex-wrap:wrap;gap:14px;align-items:center;padding:8px 20px}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:10px;padding:12px 20px}
.card{background:#fff;border:1px solid var(--line);border-radius:6px;padding:6px;cursor:pointer}
.card:hover,.card:focus{outline:2px solid #4c6ef5}.card[hidden]{display:none}
.card .imgs{display:flex;gap:4px}.card img{width:calc((100% - 8px) / 3);height:auto;aspect-ratio:1;background:#e4e6ea}
.meta{margin-top:4px;font-size:12px}.meta b{font-size:14px}
.o{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-weight:600;font-size:12px}
.o.TP{background:#2e7d32}.o.FP{background:#e65100}.o.FN{background:#c62828}.o.TN{background:#546e7a}
#viewer{position:fixed;inset:0;z-index:2;background:rgba(10,12,16,.9);color:#fff;display:flex;
 flex-direction:column;align-items:center;justify-content:center;gap:10px}#viewer[hidden]{display:none}
#viewer .imgs{display:flex;gap:10px}#viewer figure{margin:0;text-align:center}
#viewer .caption{white-space:pre-line;text-align:center}
#viewer img{width:min(30vw,80vh);height:auto;image-rendering:pixelated;background:#333}
"""

GALLERY_JS = """
(function () {
  const $ = (id) => document.getElementById(id);
  const gallery = $("gallery");
  const cards = Array.from(gallery.querySelectorAll(".card"));
  const filters = { category: $("filter-category"), defect: $("filter-defect"), outcome: $("filter-outcome") };
  function applyFilters() {
    let shown = 0;
    for (const card of cards) {
      const keep = Object.entries(filters).every(([key, sel]) => !sel.value || card.dataset[key] === sel.value);
      card.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    $("shown").textContent = shown + " of " + cards.length + " images";
  }
  function applySort() {
    const [key, dir] = $("sort").value.split(":");
    const sign = dir === "desc" ? -1 : 1;
    const value = (c) => (key === "score" ? parseFloat(c.dataset.score) : c.dataset.path);
    cards.sort((a, b) => { const x = value(a), y = value(b); return x < y ? -sign : x > y ? sign : 0; });
    gallery.append(...cards);
  }
  const viewer = $("viewer");
  function openViewer(card) {
    const figures = Array.from(card.querySelectorAll("img"), (img) => {
      const fig = document.createElement("figure");
      const big = document.createElement("img");
      big.src = img.dataset.full;
      big.alt = img.alt;
      const cap = document.createElement("figcaption");
      cap.textContent = img.alt;
      fig.append(big, cap);
      return fig;
    });
    viewer.querySelector(".imgs").replaceChildren(...figures);
    viewer.querySelector(".caption").textContent = card.querySelector(".meta").innerText;
    viewer.hidden = false;
  }
  gallery.addEventListener("click", (e) => { const card = e.target.closest(".card"); if (card) openViewer(card); });
  gallery.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.classList.contains("card")) openViewer(e.target);
  });
  viewer.addEventListener("click", () => { viewer.hidden = true; });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") viewer.hidden = true; });
  Object.values(filters).forEach((sel) => sel.addEventListener("change", applyFilters));
  $("sort").addEventListener("change", applySort);
  applyFilters();
  document.body.dataset.ready = "1";
})();
"""


def esc(value):
    return html.escape(str(value), quote=True)


def url(rel_path):
    return esc(quote(rel_path))


def render_page(title, body, script=""):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{PAGE_CSS}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


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
    def cells(row):
        return [esc(row[k] if digits is None else fmt(row[k], digits)) for k, _, digits in METRIC_COLUMNS]

    rows = [[esc(cat["name"])] + cells(cat["row"]) for cat in categories]
    rows.append(["mean / total"] + cells(summary_row([cat["row"] for cat in categories])))
    return html_table(["category"] + [name for _, name, _ in METRIC_COLUMNS], rows,
                      row_classes=[""] * len(categories) + ["total"],
                      cell_cols=["category"] + [k for k, _, _ in METRIC_COLUMNS])


def render_card(r):
    images = "".join(f'<img loading="lazy" decoding="async" src="{url(r[key])}" '
                     f'data-full="{url(r.get(key + "_full", r[key]))}" alt="{esc(alt)}">'
                     for key, alt in PANELS)
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
    plots = "".join(
        f'<h2>{esc(cat["name"])}</h2><div class="plots">'
        + "".join(f'<img loading="lazy" src="{url(path)}" alt="{esc(cat["name"])} {kind}">'
                  for kind, path in cat["plots"].items()) + "</div>"
        for cat in categories)
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
Ground truth is outlined in magenta. <code>predictions.json</code> lists every image with its files;
<code>maps/</code> hold 16-bit PNGs (value / 65535 = calibrated score, {MAP_BITS}-bit precision),
<code>masks/</code> the predicted masks.</p></header>
<details open><summary>Curves per category</summary><section>{plots}</section></details>
<div class="controls">{options("category", "filter-category", [c["name"] for c in categories])}
{options("defect type", "filter-defect", sorted({r["defect_type"] for r in records}))}
{options("outcome", "filter-outcome", OUTCOMES)}{sort}<span id="shown" class="muted"></span></div>
<div id="gallery">
{chr(10).join(render_card(r) for r in records)}
</div>
<div id="viewer" hidden><div class="imgs"></div><div class="caption"></div>
<div class="muted">click or Esc to close</div></div>"""
    return render_page(f"Report {run_name}", body, GALLERY_JS)


# ---------------------------------------------------------------- comparison of runs
# (column, higher is better, digits); the last three come from metrics/<category>.json when present.
COMPARED = (("image_AUROC", True, 4), ("pixel_AUROC", True, 4), ("PRO", True, 4),
            ("ms_per_image", False, 1), ("fit_s", False, 1), ("peak_rss_mb", False, 0))


def read_run(run_dir):
    """{category: {column: float or None}} from <run>/results.csv and its metrics/*.json."""
    from engine import RESULT_HEADER  # engine imports this module lazily; the reverse is safe here
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, "results.csv")
    if not os.path.isfile(path):
        raise UserError(f"no results.csv in {run_dir} (evaluate that run first)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != RESULT_HEADER:
        raise UserError(f"malformed {path}: the header must be {','.join(RESULT_HEADER)}")
    run = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or row[0] == "mean":
            continue
        try:
            if len(row) != len(RESULT_HEADER) or not row[0] or row[0] in run:
                raise ValueError
            run[row[0]] = {k: float(v) if v.strip() else None for k, v in zip(RESULT_HEADER[1:], row[1:])}
        except ValueError:
            raise UserError(f"malformed {path} line {line}: expected a new category and "
                            f"{len(RESULT_HEADER) - 1} numbers or blanks, got {','.join(row)}") from None
        run[row[0]].update(benchmark_figures(run_dir, row[0]))
    if not run:
        raise UserError(f"malformed {path}: no category rows")
    return run


def benchmark_figures(run_dir, category):
    path = os.path.join(run_dir, "metrics", f"{category}.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    found = {"ms_per_image": record.get("ms_per_image"), **{k: (record.get("timing") or {}).get(k)
                                                             for k in ("fit_s", "peak_rss_mb")}}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}


def run_labels(run_dirs):
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(d) for d in run_dirs]
    if len(set(names)) < len(names):
        raise UserError("the same run folder is given twice")
    return names


def best_marks(values, higher_is_better, digits):
    """Indices of the best values (ties at the shown precision all count); none with < 2 values."""
    shown = {i: round(v, digits) for i, v in enumerate(values) if v is not None}
    if len(shown) < 2:
        return set()
    best = (max if higher_is_better else min)(shown.values())
    return {i for i, v in shown.items() if v == best}


def compare_runs(run_dirs, out_dir="."):
    """Write comparison.md/.csv/.html: a row per category plus the mean over the categories
    every run has, a column group per run, the best value per metric marked."""
    labels = run_labels(run_dirs)
    runs = [read_run(d) for d in run_dirs]
    shared = sorted(set.intersection(*(set(r) for r in runs)))
    categories = sorted(set.union(*(set(r) for r in runs)))
    columns = [c for c in COMPARED if any(r[cat].get(c[0]) is not None for r in runs for cat in r)]
    rows = [(cat, [[r.get(cat, {}).get(name) for name, _, _ in columns] for r in runs]) for cat in categories]
    if shared:
        mean = [[float(np.mean(v)) if all(x is not None for x in v) else None
                 for v in ([r[cat].get(name) for cat in shared] for name, _, _ in columns)] for r in runs]
        rows.append(("mean", mean))
    # marks[row][run] = column indices holding the row's best value
    marks = [[set() for _ in runs] for _ in rows]
    for n, (_, values) in enumerate(rows):
        for j, (_, higher, digits) in enumerate(columns):
            for i in best_marks([v[j] for v in values], higher, digits):
                marks[n][i].add(j)
    unshared = [f"{cat} (only in {', '.join(l for l, r in zip(labels, runs) if cat in r)})"
                for cat in categories if cat not in shared]

    def cell(n, i, j, bold=("", "")):
        value = rows[n][1][i][j]
        text = fmt(value, columns[j][2])
        return f"{bold[0]}{text}{bold[1]}" if text and j in marks[n][i] else text

    header = ["category"] + [f"{label}:{name}" for label in labels for name, _, _ in columns]
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"comparison.{ext}") for ext in ("md", "csv", "html")]
    write_csv_atomic(paths[1], header + [f"best:{name}" for name, _, _ in columns],
                     [[cat] + [cell(n, i, j) for i in range(len(runs)) for j in range(len(columns))]
                      + ["+".join(labels[i] for i in range(len(runs)) if j in marks[n][i])
                         for j in range(len(columns))]
                      for n, (cat, _) in enumerate(rows)])
    mean_note = (f"mean: over the categories every run has ({len(shared)} of {len(categories)})." if shared
                 else "mean: none, the runs share no category.")
    notes = [mean_note, "Best value per metric in bold (AUROC, PRO: highest; time, memory: lowest)."]
    if unshared:
        notes.append("Not in every run: " + "; ".join(unshared) + ".")
    md_rows = [[cat] + [cell(n, i, j, ("**", "**")) for i in range(len(runs)) for j in range(len(columns))]
               for n, (cat, _) in enumerate(rows)]
    md = ["# Run comparison", "", *[f"- {l}: `{d}`" for l, d in zip(labels, run_dirs)], "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *["| " + " | ".join(r) + " |" for r in md_rows], "", *notes, ""]
    write_text_atomic(paths[0], "\n".join(md))
    group = "".join(f'<th colspan="{len(columns)}">{esc(l)}</th>' for l in labels)
    sub = "".join(f"<th>{esc(name)}</th>" for _ in labels for name, _, _ in columns)
    body_rows = "".join(
        f'<tr{" class=total" if cat == "mean" else ""}><td>{esc(cat)}</td>'
        + "".join(f'<td{" class=best" if j in marks[n][i] else ""}>{esc(cell(n, i, j))}</td>'
                  for i in range(len(runs)) for j in range(len(columns))) + "</tr>"
        for n, (cat, _) in enumerate(rows))
    page = ("<header><h1>Run comparison</h1><ul>"
            + "".join(f"<li>{esc(l)}: <code>{esc(d)}</code></li>" for l, d in zip(labels, run_dirs))
            + f'</ul><table><thead><tr><th rowspan="2">category</th>{group}</tr><tr>{sub}</tr></thead>'
            f"<tbody>{body_rows}</tbody></table>"
            + "".join(f'<p class="muted">{esc(text)}</p>' for text in notes) + "</header>")
    write_text_atomic(paths[2], render_page("Run comparison", page))
    print(format_table(header, [[r[0]] + [cell(n, i, j) for i in range(len(runs)) for j in range(len(columns))]
                                for n, r in enumerate(rows)]))
    for note_line in notes:
        print(note_line)
    print("comparison: " + ", ".join(paths))
    return 0
