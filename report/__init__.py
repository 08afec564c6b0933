"""Review report of an evaluation, and comparison of finished runs.

    python eval.py ... --report        -> <save_path>/report/index.html (+ images, predictions.json)
    python eval.py --compare RUN_DIR RUN_DIR [...] [--save_path OUT]
    python predict.py FOLDER --report ...  -> <output_dir>/report/index.html: review page, no labels

The report is one static page that opens from file:// (CSS and JS inline, nothing fetched) over
relative image files. Per test image it composites a few small JPEGs with numpy; matplotlib only
draws the three plots per category, so the report costs little next to the evaluation itself.

    files.py    per-image files: gallery JPEGs, 16-bit anomaly maps, predicted masks
    plots.py    per-category plots: score histogram, image ROC, PRO curve
    page.py     the HTML page (page.css and gallery.js inlined when it is written)
    builder.py  ReportBuilder: takes one category (or predicted image) at a time, swaps the report in
    review.py   review.json: the marks set on a page, read back by train.py --update --from_review
    compare.py  comparison of finished runs (eval.py --compare)
"""
from .builder import ReportBuilder, add_report_args, add_review_args, apply_thresholds, report_dir, review_page
from .compare import compare_runs
from .files import MAP_BITS, OUTCOMES, THUMB_PX

__all__ = ["ReportBuilder", "add_report_args", "add_review_args", "apply_thresholds", "report_dir", "review_page", "compare_runs",
           "MAP_BITS", "OUTCOMES", "THUMB_PX"]
