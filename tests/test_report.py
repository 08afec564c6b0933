"""Review report (--report) and run comparison (--compare): files, counts, portability, and the
page itself in a real headless Chromium."""
import csv
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from report.results import write_category_metrics, write_results
import eval as eval_script
from report import metrics
import report
import train as train_script
from conftest import ROOT, make_synthetic_category
from models.postprocess import normalize
from utils import UserError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_COPY = "/tmp/report_screenshot.png"
# (category, crop size, [(defect type, raw image score)], image threshold): every outcome occurs,
# and beta's crop is larger than a thumbnail so that it also gets full-size copies.
FAKE_CATEGORIES = [
    ("alpha", 64, [("good", 1), ("good", 2), ("good", 3), ("good", 6),
                   ("crack", 4), ("crack", 7), ("hole", 8), ("hole", 9)], 5.0),
    ("beta", 288, [("good", 1), ("good", 2), ("crack", 2.5), ("crack", 5)], 3.0),
]
FAKE_IMAGES = sum(len(images) for _, _, images, _ in FAKE_CATEGORIES)
# Image labels only (no masks): outcomes TN TN FP FN TP TP at the threshold 5.
NO_MASK_CATEGORY = ("gamma", 64, [("good", 1), ("good", 2), ("good", 6), ("dent", 4), ("dent", 7), ("dent", 8)], 5.0)
MIXED_CATEGORIES = [FAKE_CATEGORIES[0], NO_MASK_CATEGORY]  # alpha with masks, gamma without
TINY = ["--resize", "64", "--crop_size", "64", "--no_progress", "--method", "ortho"]


# ---------------------------------------------------------------- helpers
def fake_result(category, size, images, threshold, data_root, seed, no_masks=False):
    """What evaluate_category returns with the report flag, for hand-picked scores; `no_masks`:
    as for a category whose defective images have no masks (image labels only)."""
    rng = np.random.RandomState(seed)
    n = len(images)
    scores = np.array([s for _, s in images], np.float32)
    labels = np.array([d != "good" for d, _ in images], np.int64)
    rgbs = np.stack([cv2.resize((rng.rand(8, 8, 3) * 255).astype(np.uint8), (size, size)) for _ in range(n)])
    maps = np.stack([cv2.resize(rng.rand(8, 8).astype(np.float32), (size, size)) for _ in range(n)])
    masks = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(labels) if not no_masks else []:
        y, x = rng.randint(4, size // 2, 2)
        masks[i, y:y + size // 4, x:x + size // 4] = 1
        maps[i][masks[i] > 0] += 1.0
    calibration = {"image_threshold": threshold, "image_min": float(scores.min()), "image_max": float(scores.max()),
                   "pixel_threshold": 0.9, "pixel_min": 0.0, "pixel_max": float(maps.max()), "source": "test"}
    names = [f"{i:03d}.png" for i in range(n)]
    return {"category": category, "image_AUROC": metrics.auroc(labels, scores),
            "pixel_AUROC": None if no_masks else metrics.auroc(masks, maps),
            "PRO": None if no_masks else metrics.pro_auc(masks, maps), "calibration": calibration,
            "image_report": metrics.classification_report(labels, scores, threshold),
            # as evaluate_category: without masks, counted against the all-zero masks (F1 0)
            "pixel_report": metrics.classification_report(masks, maps, calibration["pixel_threshold"]),
            "config": {"method": "ortho", "arch": "resnet18", "k": 100, "seed": 521, "resize": size,
                       "crop_size": size, "backbone_weights": "resnet18.pdparams"},
            "predictions": [{"image_path": os.path.join(data_root, category, "test", d, name), "defect_type": d,
                             "label": int(l), "raw_score": float(s)}
                            for (d, s), l, name in zip(images, labels, names)],
            "arrays": {"scores": scores, "maps": maps, "masks": masks, "labels": labels, "rgbs": rgbs,
                       "pro_curve": None if no_masks else metrics.pro_curve(masks, maps)[:2]},
            **({"no_masks": True} if no_masks else {})}


def build_fake_report(save_path, data_root, categories=FAKE_CATEGORIES, no_masks=()):
    """`no_masks`: names of the categories evaluated without masks."""
    results = [fake_result(*c, data_root, seed, c[0] in no_masks) for seed, c in enumerate(categories)]
    with report.ReportBuilder(save_path, data_root, progress=False) as builder:
        for r in results:
            builder.add(r)
        builder.finish()
    return results


def read_page(save_path):
    with open(os.path.join(save_path, "report", "index.html"), encoding="utf-8") as f:
        return f.read()


def read_predictions(save_path):
    with open(os.path.join(save_path, "report", "predictions.json"), encoding="utf-8") as f:
        return json.load(f)


def assert_portable(save_path, *absolute_parts):
    """Nothing fetched from the network, nothing addressed outside the report folder."""
    page = read_page(save_path)
    assert "http://" not in page and "https://" not in page
    texts = [page, json.dumps(read_predictions(save_path))]
    for part in absolute_parts:
        assert all(part not in t for t in texts), f"absolute path {part} in the report"
    links = re.findall(r'(?:src|href|data-full)="([^"]*)"', page)
    assert links
    for link in links:
        assert not link.startswith("/") and ".." not in link, link
        assert os.path.isfile(os.path.join(save_path, "report", link)), f"broken link {link}"


def card_count(page):
    return len(re.findall(r'<div class="card"', page))


def table_cell(page, row_class, column):
    row = re.search(rf'<tr class="{row_class}">(.*?)</tr>', page).group(1)
    return re.search(rf'<td data-col="{column}">([^<]*)</td>', row).group(1)


def category_cell(page, category, column):
    row = re.search(rf'<tr><td data-col="category">{category}</td>(.*?)</tr>', page).group(1)
    return re.search(rf'<td data-col="{column}">([^<]*)</td>', row).group(1)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- builder on hand-made results
def test_report_files_counts_and_encodings(tmp_path):
    data_root, save = str(tmp_path / "data"), str(tmp_path / "run")
    results = build_fake_report(save, data_root)
    records = read_predictions(save)
    page = read_page(save)
    assert len(records) == card_count(page) == FAKE_IMAGES
    assert_portable(save, str(tmp_path))
    assert records[0]["image_path"] == "alpha/test/good/000.png"
    assert {"image_path", "category", "defect_type", "label", "pred_score", "pred_label", "anomaly_map",
            "pred_mask", "outcome"} <= set(records[0])
    by_outcome = {o: sum(r["outcome"] == o for r in records) for o in report.OUTCOMES}
    assert by_outcome == {"TP": 4, "FP": 1, "FN": 2, "TN": 5}
    for o in report.OUTCOMES:
        assert int(table_cell(page, "total", o)) == by_outcome[o]
    for plot in ("histogram", "roc", "pro"):
        for category, *_ in FAKE_CATEGORIES:
            assert os.path.isfile(os.path.join(save, "report", "plots", category, f"{plot}.png"))

    folder = os.path.join(save, "report")
    rec_by_path = {r["image_path"]: r for r in records}
    for result in results:
        c, a = result["calibration"], result["arrays"]
        for i, p in enumerate(result["predictions"]):
            rec = rec_by_path[os.path.relpath(p["image_path"], data_root)]
            assert (rec["pred_score"] >= 0.5) == (rec["pred_label"] == "anomalous")
            amap = cv2.imread(os.path.join(folder, rec["anomaly_map"]), cv2.IMREAD_UNCHANGED)
            assert amap.dtype == np.uint16
            expected = normalize(a["maps"][i], c["pixel_threshold"], c["pixel_min"], c["pixel_max"])
            np.testing.assert_allclose(amap / 65535.0, expected, atol=1.0 / 2 ** report.MAP_BITS)
            mask = np.asarray(Image.open(os.path.join(folder, rec["pred_mask"]))) > 0
            np.testing.assert_array_equal(mask, a["maps"][i] >= c["pixel_threshold"])
            with Image.open(os.path.join(folder, rec["image"])) as thumb:
                assert thumb.format == "JPEG" and max(thumb.size) <= report.THUMB_PX
            with Image.open(os.path.join(folder, rec["image_full"])) as full:
                assert full.size == a["maps"][i].shape[::-1]


def test_report_folder_is_replaced_whole(tmp_path):
    data_root, save = str(tmp_path / "data"), str(tmp_path / "run")
    build_fake_report(save, data_root)
    build_fake_report(save, data_root, FAKE_CATEGORIES[:1])
    assert not os.path.exists(os.path.join(save, "report", "plots", "beta")), "old files left behind"
    assert len(read_predictions(save)) == len(FAKE_CATEGORIES[0][2])

    with pytest.raises(RuntimeError):  # a run dying half-way keeps the last complete report
        with report.ReportBuilder(save, data_root, progress=False) as builder:
            builder.add(fake_result(*FAKE_CATEGORIES[1], data_root, 0))
            raise RuntimeError("interrupted")
    assert len(read_predictions(save)) == len(FAKE_CATEGORIES[0][2])
    assert sorted(os.listdir(save)) == ["report"], "temporary folders left behind"


def test_report_of_a_category_without_masks(tmp_path):
    data_root, save = str(tmp_path / "data"), str(tmp_path / "run")
    results = build_fake_report(save, data_root, MIXED_CATEGORIES, no_masks={"gamma"})
    page, records = read_page(save), read_predictions(save)
    assert_portable(save, str(tmp_path))
    n_alpha, n_gamma = len(FAKE_CATEGORIES[0][2]), len(NO_MASK_CATEGORY[2])
    assert len(records) == card_count(page) == n_alpha + n_gamma
    gamma = [r for r in records if r["category"] == "gamma"]
    assert [r["outcome"] for r in gamma] == ["TN", "TN", "FP", "FN", "TP", "TP"]
    for column in ("pixel_AUROC", "PRO", "pixel_F1"):
        assert category_cell(page, "gamma", column) == "no masks"
        assert category_cell(page, "alpha", column) not in ("", "no masks")
        assert table_cell(page, "total", column) == ""  # no mean over a category without the metric
    assert category_cell(page, "gamma", "image_AUROC") == f"{results[1]['image_AUROC']:.4f}"
    assert category_cell(page, "gamma", "pixel_threshold") == "0.9000"  # calibrated on normal images
    assert int(table_cell(page, "total", "FN")) == 1 + 1  # alpha, gamma
    plots = os.path.join(save, "report", "plots")
    assert sorted(os.listdir(os.path.join(plots, "gamma"))) == ["histogram.png", "roc.png"]
    assert sorted(os.listdir(os.path.join(plots, "alpha"))) == ["histogram.png", "pro.png", "roc.png"]
    assert "gamma: no masks, so no PRO curve" in page and "gamma: no masks (image labels only)" in page
    alts = dict(re.findall(r'data-category="(\w+)"[^>]*><div class="imgs"><img [^>]* alt="([^"]*)"', page))
    assert alts == {"alpha": "image + ground truth", "gamma": "image"}
    # a model's stored thresholds applied to it: image counts recomputed, no pixel counts
    stored = dict(results[1]["calibration"], image_threshold=6.5)
    report.apply_thresholds(results[1], stored)
    assert results[1]["pixel_report"] is None
    assert {k: results[1]["image_report"][k] for k in report.OUTCOMES} == {"TP": 2, "FP": 0, "FN": 1, "TN": 3}


def test_report_where_no_category_has_masks(tmp_path):
    """The "mean / total" row reads "no masks" for the pixel metrics, like the categories' rows."""
    data_root, save = str(tmp_path / "data"), str(tmp_path / "run")
    build_fake_report(save, data_root, [NO_MASK_CATEGORY], no_masks={"gamma"})
    page = read_page(save)
    for column in ("pixel_AUROC", "PRO", "pixel_F1"):
        assert category_cell(page, "gamma", column) == table_cell(page, "total", column) == "no masks"
    assert table_cell(page, "total", "image_AUROC") == category_cell(page, "gamma", "image_AUROC") != "no masks"
    assert "the pixel threshold follows the image threshold" in page


def test_results_table_where_no_category_has_masks(tmp_path, capsys):
    """results.csv leaves pixel cells empty; the printed table reads "no masks", the mean row too."""
    data_root, save = str(tmp_path / "data"), str(tmp_path / "run")
    results = [fake_result(name, *NO_MASK_CATEGORY[1:], data_root, seed, no_masks=True)
               for seed, name in enumerate(("gamma", "delta"))]
    write_results(save, results)
    printed = {line.split()[0]: line.split(None, 2)[2] for line in capsys.readouterr().out.splitlines()
               if line.startswith(("gamma", "delta", "mean"))}
    assert sorted(printed) == ["delta", "gamma", "mean"]
    assert all(cells.split() == ["no", "masks", "no", "masks"] for cells in printed.values()), printed
    rows = read_csv(os.path.join(save, "results.csv"))
    assert rows[-1]["category"] == "mean" and rows[-1]["pixel_AUROC"] == rows[-1]["PRO"] == ""


def test_compare_shows_no_masks(tmp_path):
    """Runs written by the engine's own writers: a masked run (alpha without PRO, gamma with
    masks) against image-label runs of gamma."""
    data_root = str(tmp_path / "data")
    runs = {name: str(tmp_path / name) for name in ("masked", "labels", "labels2")}
    alpha = fake_result(*FAKE_CATEGORIES[0], data_root, 0)
    alpha["PRO"] = None  # evaluated without --eval_PRO: blank, not "no masks"
    for name, results in (("masked", [alpha, fake_result(*NO_MASK_CATEGORY, data_root, 1)]),
                          ("labels", [fake_result(*NO_MASK_CATEGORY, data_root, 1, True)]),
                          ("labels2", [fake_result(*NO_MASK_CATEGORY, data_root, 2, True)])):
        for r in results:
            write_category_metrics(runs[name], r)
        write_results(runs[name], results)
    out = str(tmp_path / "cmp")
    assert eval_script.main(["--compare", runs["masked"], runs["labels"], "--save_path", out]) == 0
    table = {r["category"]: r for r in read_csv(os.path.join(out, "comparison.csv"))}
    masked = {r["category"]: r for r in read_csv(os.path.join(runs["masked"], "results.csv"))}
    assert table["gamma"]["labels:pixel_AUROC"] == table["gamma"]["labels:PRO"] == "no masks"
    assert table["gamma"]["masked:pixel_AUROC"] == masked["gamma"]["pixel_AUROC"] != ""
    assert table["gamma"]["labels:image_AUROC"] == table["gamma"]["masked:image_AUROC"] != ""
    assert table["gamma"]["best:pixel_AUROC"] == ""  # one value: nothing to compare it with
    assert table["gamma"]["best:image_AUROC"] == "masked+labels"
    assert table["alpha"]["masked:PRO"] == "" and table["mean"]["labels:pixel_AUROC"] == ""
    md = open(os.path.join(out, "comparison.md")).read()
    assert "no masks: gamma" in md and "| no masks |" in md
    assert "<td>no masks</td>" in open(os.path.join(out, "comparison.html")).read()

    out2 = str(tmp_path / "cmp2")  # only image-label runs: the pixel columns stay, saying why they are empty
    assert eval_script.main(["--compare", runs["labels"], runs["labels2"], "--save_path", out2]) == 0
    row = read_csv(os.path.join(out2, "comparison.csv"))[0]
    assert row["category"] == "gamma" and row["labels2:PRO"] == row["labels:pixel_AUROC"] == "no masks"


# ---------------------------------------------------------------- real runs on synthetic data
@pytest.fixture(scope="module")
def tiny_runs(r18_weights, tmp_path_factory):
    """Two small real runs: k10 on widget with --report, k20 on widget + gadget."""
    base = tmp_path_factory.mktemp("tiny")
    data = str(base / "data")
    make_synthetic_category(data, "widget", seed=0)
    runs = {}
    for name, category in (("k10", "widget"), ("k20", "all")):
        runs[name] = str(base / name)
        if name == "k20":
            make_synthetic_category(data, "gadget", seed=5)
        extra = ["--report"] if name == "k10" else ["--eval_PRO"]
        assert train_script.main(["--data_path", data, "--category", category, "--k", name[1:], "--backbone_weights",
                                  r18_weights, "--eval", "--save_path", runs[name], *TINY, *extra]) == 0
    return data, runs


def test_train_and_eval_write_the_report(tiny_runs, tmp_path):
    data, runs = tiny_runs
    n_test = len(read_predictions(runs["k10"]))
    assert n_test == 5 and card_count(read_page(runs["k10"])) == 5
    assert_portable(runs["k10"], os.path.dirname(data))

    out = str(tmp_path / "eval")
    assert eval_script.main(["--data_path", data, "--category", "widget", "--k", "10", "--model_path", runs["k10"],
                             "--save_path", out, "--update_thresholds", "False", "--report", *TINY]) == 0
    assert card_count(read_page(out)) == 5 and read_csv(os.path.join(out, "results.csv"))[0]["PRO"]
    assert_portable(out, os.path.dirname(data))
    metrics_record = json.load(open(os.path.join(runs["k10"], "metrics", "widget.json")))
    fn = sum(r["outcome"] == "FN" for r in read_predictions(out))
    assert fn == metrics_record["image_report"]["FN"] == int(table_cell(read_page(out), "total", "FN"))


def test_report_needs_stored_thresholds(tiny_runs, r18_weights, tmp_path, capsys):
    data, _ = tiny_runs
    save = str(tmp_path / "uncalibrated")
    assert train_script.main(["--data_path", data, "--category", "widget", "--k", "10", "--calib_ratio", "0",
                              "--backbone_weights", r18_weights, "--save_path", save, *TINY]) == 0
    with pytest.raises(UserError, match="has no stored thresholds, which --report shows"):
        eval_script.main(["--data_path", data, "--category", "widget", "--k", "10", "--save_path", save,
                          "--update_thresholds", "False", "--report", *TINY])
    assert not os.path.exists(os.path.join(save, "report"))
    assert not [f for f in os.listdir(save) if f.startswith(".")]


def test_compare_matches_each_results_csv(tiny_runs, tmp_path):
    _, runs = tiny_runs
    out = str(tmp_path / "cmp")
    assert eval_script.main(["--compare", runs["k10"], runs["k20"], "--save_path", out]) == 0
    table = {r["category"]: r for r in read_csv(os.path.join(out, "comparison.csv"))}
    assert set(table) == {"widget", "gadget", "mean"}
    for label, path in runs.items():
        for row in read_csv(os.path.join(path, "results.csv")):
            if row["category"] != "mean":
                for metric in ("image_AUROC", "pixel_AUROC", "PRO"):
                    assert table[row["category"]][f"{label}:{metric}"] == row[metric]
        timing = json.load(open(os.path.join(path, "metrics", "widget.json")))
        assert float(table["widget"][f"{label}:fit_s"]) == pytest.approx(timing["timing"]["fit_s"], abs=0.05)
    for metric in ("image_AUROC", "pixel_AUROC"):  # mean over the shared category only
        assert table["mean"][f"k20:{metric}"] == table["widget"][f"k20:{metric}"]
        assert table["widget"][f"best:{metric}"]
    md = open(os.path.join(out, "comparison.md")).read()
    assert "gadget (only in k20)" in md and "| widget |" in md
    page = open(os.path.join(out, "comparison.html")).read()
    assert "http://" not in page and "https://" not in page and 'class=best' in page


def test_compare_rejects_bad_runs(tiny_runs, tmp_path):
    _, runs = tiny_runs
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_header, bad_value = tmp_path / "bad_header", tmp_path / "bad_value"
    for folder, text in ((bad_header, "cat,auc\nwidget,0.9\n"),
                         (bad_value, "category,image_AUROC,pixel_AUROC,PRO\nwidget,0.9,high,\n")):
        folder.mkdir()
        (folder / "results.csv").write_text(text)
    for folder, message in ((tmp_path / "missing", "run folder not found"), (empty, "no results.csv"),
                            (bad_header, "malformed"), (bad_value, "malformed")):
        with pytest.raises(UserError, match=message):
            eval_script.main(["--compare", runs["k10"], str(folder), "--save_path", str(tmp_path / "cmp")])
    assert not os.path.exists(tmp_path / "cmp")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--compare", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the page in a real browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through selenium; offline, fresh profile, console captured."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -r requirements.txt", pytrace=False)
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} missing: run .ci/install_browser.sh", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 "--disable-dev-shm-usage",  # a container's small /dev/shm makes Chromium's processes fail
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from looking for one online.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_report(driver, save_path):
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get("file://" + os.path.abspath(os.path.join(save_path, "report", "index.html")))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def choose(driver, element_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def visible_cards(driver):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden)"
        ".map(c => [c.dataset.category, c.dataset.outcome, parseFloat(c.dataset.score)])")


def load_all_images(driver):
    """Scroll through the page so every lazy image loads; -> sources that failed to load."""
    from selenium.webdriver.support.ui import WebDriverWait
    height = driver.execute_script("return document.body.scrollHeight")
    for y in range(0, height + 1000, 600):
        driver.execute_script(f"window.scrollTo(0, {y})")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete)"))
    driver.execute_script("window.scrollTo(0, 0)")
    return driver.execute_script(
        "return Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src)")


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_in_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    save = str(tmp_path / "run")
    build_fake_report(save, str(tmp_path / "data"))
    page = read_page(save)
    open_report(browser, save)
    assert len(visible_cards(browser)) == FAKE_IMAGES
    assert load_all_images(browser) == []

    for outcome in report.OUTCOMES:
        choose(browser, "filter-outcome", outcome)
        shown = visible_cards(browser)
        assert len(shown) == int(table_cell(page, "total", outcome)) and {c[1] for c in shown} == {outcome}
    choose(browser, "filter-outcome", "")
    choose(browser, "filter-category", "beta")
    assert {c[0] for c in visible_cards(browser)} == {"beta"} and len(visible_cards(browser)) == 4
    choose(browser, "filter-defect", "crack")
    assert len(visible_cards(browser)) == 2
    choose(browser, "filter-category", "")
    choose(browser, "filter-defect", "")
    for order, descending in (("score:desc", True), ("score:asc", False)):
        choose(browser, "sort", order)
        scores = [c[2] for c in visible_cards(browser)]
        assert scores == sorted(scores, reverse=descending) and len(scores) == FAKE_IMAGES

    card = browser.find_element(By.CSS_SELECTOR, '.card[data-category="beta"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)  # clear of the sticky bar
    card.click()
    viewer = browser.find_element(By.ID, "viewer")
    assert viewer.is_displayed()
    big = browser.execute_script("return Array.from(document.querySelectorAll('#viewer img'))"
                                 ".map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert len(big) == 3 and all("_thumb" not in src for src, _ in big)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not viewer.is_displayed()

    choose(browser, "sort", "score:desc")
    browser.set_window_size(1400, 2200)  # header, metrics, plots and gallery in one picture
    browser.execute_script("window.scrollTo(0, 0)")
    for path in (str(tmp_path / "report.png"), SCREENSHOT_COPY):
        assert browser.save_screenshot(path)
    assert console_errors(browser) == []


def test_no_mask_page_in_browser(browser, tmp_path):
    save = str(tmp_path / "run")
    build_fake_report(save, str(tmp_path / "data"), MIXED_CATEGORIES, no_masks={"gamma"})
    open_report(browser, save)
    n_alpha, n_gamma = len(FAKE_CATEGORIES[0][2]), len(NO_MASK_CATEGORY[2])
    assert len(visible_cards(browser)) == n_alpha + n_gamma
    assert load_all_images(browser) == []
    choose(browser, "filter-category", "gamma")
    assert [c[:2] for c in visible_cards(browser)] == [["gamma", o] for o in ("TN", "TN", "FP", "FN", "TP", "TP")]
    choose(browser, "filter-outcome", "TP")
    assert len(visible_cards(browser)) == 2
    choose(browser, "filter-defect", "dent")
    assert len(visible_cards(browser)) == 2
    choose(browser, "filter-outcome", "FP")
    assert visible_cards(browser) == []
    assert console_errors(browser) == []


def test_real_report_in_browser(browser, tiny_runs):
    _, runs = tiny_runs
    open_report(browser, runs["k10"])
    assert len(visible_cards(browser)) == len(read_predictions(runs["k10"])) == 5
    assert load_all_images(browser) == []
    assert console_errors(browser) == []
