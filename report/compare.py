"""Comparison of finished runs (eval.py --compare): comparison.md/.csv/.html from each run's
results.csv and metrics/<category>.json."""
import csv
import json
import os

import numpy as np

from report.results import RESULT_HEADER
from utils import UserError, fmt, format_table, write_csv_atomic, write_text_atomic

from .page import MASK_METRICS, NO_MASKS, esc, render_page

# (column, higher is better, digits); the last three come from metrics/<category>.json when present.
COMPARED = (("image_AUROC", True, 4), ("pixel_AUROC", True, 4), ("PRO", True, 4),
            ("ms_per_image", False, 1), ("fit_s", False, 1), ("peak_rss_mb", False, 0))


def read_run(run_dir):
    """{category: {column: float or None, "no_masks": bool}} from <run>/results.csv and its metrics/*.json."""
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
        run[row[0]].update(category_record(run_dir, row[0]))
    if not run:
        raise UserError(f"malformed {path}: no category rows")
    return run


def category_record(run_dir, category):
    """Speed and memory figures of metrics/<category>.json, and whether the category has no masks."""
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
    figures = {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}
    return {**figures, "no_masks": record.get("no_masks") is True}


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
    every run has, a column group per run, the best value per metric marked. A metric that
    needs masks reads "no masks" for a category without them."""
    labels = run_labels(run_dirs)
    runs = [read_run(d) for d in run_dirs]
    shared = sorted(set.intersection(*(set(r) for r in runs)))
    categories = sorted(set.union(*(set(r) for r in runs)))
    columns = [c for c in COMPARED if any(r[cat].get(c[0]) is not None
                                          or (c[0] in MASK_METRICS and r[cat].get("no_masks"))
                                          for r in runs for cat in r)]
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
    no_masks = [cat for cat in categories if any(r.get(cat, {}).get("no_masks") for r in runs)]

    def cell(n, i, j, bold=("", "")):
        value = rows[n][1][i][j]
        if value is None and columns[j][0] in MASK_METRICS and runs[i].get(rows[n][0], {}).get("no_masks"):
            return NO_MASKS
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
    if no_masks:
        notes.append(f"{NO_MASKS}: {', '.join(no_masks)} (image labels only: no pixel AUROC or PRO).")
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
