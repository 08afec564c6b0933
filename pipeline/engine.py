"""Running an entry script's work over the selected categories: one after another, or spread
over the workers of a paddle.distributed launch; results table, metrics files and the report.

The entry scripts parse flags (pipeline/cli.py) and hand their per-category work (training.py,
evaluation.py, updating.py) to `run_categories`.
"""
import sys

import report
from pipeline import scaleout
from datasets import open_dataset
from report.results import print_reports, write_category_metrics, write_results
from utils import UserError, fmt


def run_categories(args, work, title, categories=None):
    """Run `work(args, category)` over the selected categories (`categories`, else those --category
    selects in the data). A failing category is reported and skipped; the finished ones keep their
    models and rows. Exit code 1 if any failed. With --report, the report package takes each
    category as it finishes and swaps the report in at the end."""
    if not getattr(args, "report", False):
        return run_each_category(args, work, title, categories=categories)
    with report.ReportBuilder(args.save_path, args.data_path, progress=not args.no_progress) as builder:
        code = run_each_category(args, work, title, on_result=builder.add, categories=categories)
        if builder.categories:
            builder.finish()
    return code


def run_each_category(args, work, title, on_result=None, categories=None):
    dataset = open_dataset(args)
    categories = categories or dataset.categories(args.category)
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
