"""The review loop: predict.py / infer.py --report write the review page of unlabelled images,
a reviewer marks cards (click and keys) in a real headless Chromium, the page's review.json
feeds train.py --update --from_review, which equals --update on the same images."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import export_model
import infer
import predict
import train as train_script
from conftest import ROOT, make_synthetic_category
from models import load_model
from models.version import version_of
from report.review import REVIEW_FORMAT
from test_report import TINY, browser, card_count, console_errors, load_all_images, open_report, read_page  # noqa: F401
from utils import UserError

K10 = ["--k", "10", *TINY]
LINE_IMAGES = 6 + 3  # the line folder: another seed's 6 good training images and 3 defective ones


@pytest.fixture(scope="module")
def tiny_model(r18_weights, tmp_path_factory):
    """A small OrthoAD model of the synthetic widget fitted with --keep_sums (its report made by
    --report), and a 'line' folder of unlabelled images the model has not seen."""
    base = tmp_path_factory.mktemp("review")
    data = str(base / "data")
    make_synthetic_category(data, "widget", seed=0)
    run = str(base / "run")
    assert train_script.main(["--data_path", data, "--category", "widget", "--backbone_weights", r18_weights,
                              "--eval", "--keep_sums", "--report", "--save_path", run, *K10]) == 0
    other = make_synthetic_category(str(base / "other"), "widget", seed=7)
    line = str(base / "line")
    os.makedirs(line)
    for folder, prefix in (("train/good", "part"), ("test/scratch", "scratched")):
        for name in sorted(os.listdir(os.path.join(other, folder))):
            shutil.copy(os.path.join(other, folder, name), os.path.join(line, f"{prefix}_{name}"))
    return {"data": data, "run": run, "model": os.path.join(run, "widget.pdparams"), "line": line, "base": base}


def copy_model(model, folder):
    """The model and its sums in a fresh folder -> the copy's model path."""
    os.makedirs(folder)
    for suffix in (".pdparams", ".sums.npz"):
        shutil.copy(model[:-len(".pdparams")] + suffix, folder)
    return os.path.join(folder, os.path.basename(model))


def write_review(path, images, version, **fields):
    review = {"format": REVIEW_FORMAT, "report": "test", "model_version": version, "paths_relative_to": None,
              "images": [{"category": "widget", "score": 0.6, "model_version": version, **image} for image in images],
              **fields}
    with open(path, "w") as f:
        json.dump(review, f)
    return str(path)


def card_scores(page):
    return [float(s) for s in re.findall(r'<div class="card"[^>]* data-score="([0-9.]+)"', page)]


def stdout_records(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- the pages
def test_predict_report_page(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "pred")
    capsys.readouterr()
    assert predict.main([tiny_model["line"], "--category", "widget", "--model_path", tiny_model["run"],
                         "--output_dir", out, "--report", *K10]) == 0
    printed = stdout_records(capsys.readouterr().out)
    page = read_page(out)
    version = version_of(load_model(tiny_model["model"]))["id"]
    assert len(printed) == card_count(page) == LINE_IMAGES
    assert "Review of predictions" in page and f"<b>model version</b> {version}" in page
    assert "<h2>Metrics</h2>" not in page and 'id="filter-outcome"' not in page and 'id="filter-pred"' in page
    scores = card_scores(page)
    assert scores == sorted(scores, reverse=True)  # sorted by score, high first
    with open(os.path.join(out, "report", "predictions.json")) as f:
        records = {r["image_path"]: r for r in json.load(f)}
    for rec in printed:  # the page shows the numbers predict.py prints, paths as given
        assert records[rec["image_path"]]["pred_score"] == rec["pred_score"]
        assert records[rec["image_path"]]["pred_label"] == rec["pred_label"]
        assert rec["image_path"].startswith(tiny_model["line"])
    # calibrated heat maps: the 16-bit map of the page is predict.py's .npy map
    import cv2
    first = printed[0]
    page_map = cv2.imread(os.path.join(out, "report", records[first["image_path"]]["anomaly_map"]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_allclose(page_map / 65535.0, np.load(first["anomaly_map"]), atol=1.0 / 2 ** 12)
    # an earlier page is kept unless --overwrite, like the prediction files
    with pytest.raises(UserError, match="output already exists"):
        predict.main([tiny_model["line"], "--category", "widget", "--model_path", tiny_model["run"],
                      "--output_dir", out, "--report", *K10])
    # the eval report's header names the model version too
    assert f"<b>model version</b> {version}" in read_page(tiny_model["run"])


def test_infer_report_page(tiny_model, tmp_path):
    deployed, out = str(tmp_path / "deployed"), str(tmp_path / "infer")
    assert export_model.main(["--model_path", tiny_model["model"], "--save_dir", deployed, "--k", "10"]) == 0
    assert infer.main(["--model_dir", deployed, "--input_file", tiny_model["line"], "--cpu_threads", "2",
                       "--save_path", out, "--report"]) == 0
    page = read_page(out)
    version = version_of(load_model(tiny_model["model"]))["id"]
    assert card_count(page) == LINE_IMAGES and f"<b>model version</b> {version}" in page
    assert 'data-category="widget"' in page
    with open(os.path.join(out, "infer_results.jsonl")) as f:
        printed = sorted(rec["pred_score"] for rec in map(json.loads, f))
    assert sorted(card_scores(page)) == pytest.approx(printed, abs=5e-7)


# ---------------------------------------------------------------- marks in a real browser, then --update
def test_marks_download_and_update(tiny_model, browser, tmp_path, capsys):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    out = str(tmp_path / "pred")
    assert predict.main([tiny_model["line"], "--category", "widget", "--model_path", tiny_model["run"],
                         "--output_dir", out, "--report", *K10]) == 0
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    open_report(browser, out)
    assert load_all_images(browser) == []

    def cards():
        return browser.execute_script("return Array.from(document.querySelectorAll('.card'))"
                                      ".map(c => [c.dataset.path, c.dataset.mark, parseFloat(c.dataset.score)])")

    def press(keys):
        ActionChains(browser).send_keys(keys).perform()

    order = [c[0] for c in cards()]
    scores = {c[0]: c[2] for c in cards()}
    # by click: the two highest-scored cards good, then the second's mark clicked off and on again
    for n in (0, 1, 1, 1):
        card = browser.find_elements(By.CSS_SELECTOR, ".card")[n]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
        card.find_element(By.CSS_SELECTOR, 'button.mark[data-set="good"]').click()
    assert not browser.find_element(By.ID, "viewer").is_displayed()  # a mark button does not open the viewer
    # by key, from the focused second card: j j -> fourth card; g, then j d, j g u (unmarked again)
    press("jj")
    assert browser.execute_script("return document.activeElement.dataset.path") == order[3]
    press("g")
    press("jd")
    press("jgu")
    press("kk")  # back up: the focus moves, no mark changes
    expected = {order[0]: "good", order[1]: "good", order[3]: "good", order[4]: "defect"}
    assert {p: m for p, m, _ in cards() if m != "none"} == expected
    assert browser.find_element(By.ID, "marked").text == "3 good, 1 defect marked"

    def reload():
        browser.refresh()
        WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))

    # marks survive reloads, also a mark changed just before one (the fifth card: good, defect, ...)
    for n in range(6):
        card = browser.find_elements(By.CSS_SELECTOR, ".card")[4]
        mark = "good" if n % 2 == 0 else "defect"
        card.find_element(By.CSS_SELECTOR, f'button.mark[data-set="{mark}"]').click()
        expected[order[4]] = mark
        reload()
        assert {p: m for p, m, _ in cards() if m != "none"} == expected, f"reload {n}"
    # both copies hold the marks: localStorage's, for a later visit in a new tab, and the tab's
    # (window.name), which alone brings them back on a reload into a process whose file://
    # localStorage is empty (Chromium does that now and then: the CI run that lost every mark)
    key = browser.execute_script("return document.getElementById('review').dataset.key")
    stored = browser.execute_script("return [localStorage.getItem(arguments[0]), window.name]", key)
    by_path = {k.split("\n", 1)[1]: m for k, m in json.loads(stored[0]).items()}
    assert by_path == expected and json.loads(stored[1])[key] == json.loads(stored[0])
    browser.execute_script("localStorage.clear()")
    reload()
    assert {p: m for p, m, _ in cards() if m != "none"} == expected
    browser.execute_script("document.getElementById('filter-mark').value = 'good';"
                           "document.getElementById('filter-mark').dispatchEvent(new Event('change'))")
    assert sorted(p for p, _, _ in cards() if p in expected and expected[p] == "good") == sorted(
        browser.execute_script("return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden)"
                               ".map(c => c.dataset.path)"))
    browser.find_element(By.ID, "download").click()
    target = downloads / "review.json"
    WebDriverWait(browser, 20).until(lambda d: target.exists())
    review = json.loads(target.read_text())
    version = version_of(load_model(tiny_model["model"]))["id"]
    assert review["format"] == REVIEW_FORMAT and review["model_version"] == version
    assert review["paths_relative_to"] is None
    assert {i["path"]: i["mark"] for i in review["images"]} == expected
    for image in review["images"]:
        assert image["score"] == pytest.approx(scores[image["path"]]) and image["model_version"] == version
        assert image["category"] == "widget"

    # load review.json: the downloaded marks onto a page whose tab and storage have none
    browser.execute_script("localStorage.clear(); window.name = '';")
    reload()
    assert browser.find_element(By.ID, "marked").text == "0 good, 0 defect marked"

    def load(path):
        browser.execute_script("document.getElementById('loaded').textContent = ''")
        browser.find_element(By.ID, "load").send_keys(str(path))
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "loaded").text)
        return browser.find_element(By.ID, "loaded").text

    assert load(target) == "4 marks loaded from review.json"
    assert {p: m for p, m, _ in cards() if m != "none"} == expected
    assert browser.find_element(By.ID, "marked").text == "3 good, 1 defect marked"
    reload()  # loaded marks are kept like clicked ones
    assert {p: m for p, m, _ in cards() if m != "none"} == expected
    other = dict(review, images=[{**review["images"][0], "mark": "defect"},
                                 {**review["images"][0], "path": "/elsewhere/part.png"}])
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert load(tmp_path / "other.json") == "1 marks loaded from other.json, 1 not on this page"
    assert dict((p, m) for p, m, _ in cards())[review["images"][0]["path"]] == "defect"
    marked = browser.find_element(By.ID, "marked").text
    (tmp_path / "bad.json").write_text('{"format": "something else", "images": []}')
    assert load(tmp_path / "bad.json") == f"bad.json: not a review.json (format {REVIEW_FORMAT})"
    assert browser.find_element(By.ID, "marked").text == marked  # a refused file changes no mark
    assert console_errors(browser) == []

    # --update --from_review == --update on the same images (a data folder holding copies of them)
    reviewed = copy_model(tiny_model["model"], str(tmp_path / "reviewed"))
    plain = copy_model(tiny_model["model"], str(tmp_path / "plain"))
    new_data = tmp_path / "new"
    os.makedirs(new_data / "widget" / "train" / "good")
    for path, mark in expected.items():
        if mark == "good":
            shutil.copy(path, new_data / "widget" / "train" / "good")
    capsys.readouterr()
    assert train_script.main(["--update", "--from_review", str(target), "--model_path", reviewed, *K10]) == 0
    printed = capsys.readouterr().out
    assert "3 images added, 9 in all" in printed and "1 images marked defect left out" in printed
    assert train_script.main(["--update", "--data_path", str(new_data), "--category", "widget",
                              "--model_path", plain, *K10]) == 0
    a, b = load_model(reviewed), load_model(plain)
    assert sorted(a["stats"]) == sorted(b["stats"])
    for key in a["stats"]:
        np.testing.assert_array_equal(a["stats"][key], b["stats"][key])
    assert a["train_images"] == b["train_images"] == 9
    assert a["version"]["id"] == b["version"]["id"] != version
    assert a["version"]["parent"] == version and a["version"]["train_images"] == 9
    with np.load(reviewed[:-len(".pdparams")] + ".sums.npz") as sa, np.load(plain[:-len(".pdparams")] + ".sums.npz") as sb:
        for key in ("count", "sum", "outer"):
            np.testing.assert_array_equal(sa[key], sb[key])


def test_eval_report_cards_are_marked_too(tiny_model, browser, tmp_path):  # noqa: F811
    """eval.py's report: the same marks; its review names images relative to the data root."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    open_report(browser, tiny_model["run"])
    card = browser.find_element(By.CSS_SELECTOR, '.card[data-outcome]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus()", card)
    ActionChains(browser).send_keys("d").perform()
    review = browser.execute_script(
        "const r = document.getElementById('review').dataset; return [r.paths, r.version, "
        "Array.from(document.querySelectorAll('.card')).filter(c => c.dataset.mark !== 'none').map(c => c.dataset.path)]")
    assert review[0] == "data_path" and review[1] == version_of(load_model(tiny_model["model"]))["id"]
    assert len(review[2]) == 1 and not os.path.isabs(review[2][0])
    assert os.path.isfile(os.path.join(tiny_model["data"], review[2][0]))
    assert console_errors(browser) == []


# ---------------------------------------------------------------- bad review.json: one line, model untouched
def test_bad_reviews(tiny_model, tmp_path, capsys):
    model = copy_model(tiny_model["model"], str(tmp_path / "m"))
    version = version_of(load_model(model))["id"]
    line = sorted(os.path.join(tiny_model["line"], n) for n in os.listdir(tiny_model["line"]))
    not_json = tmp_path / "not.json"
    not_json.write_text("{marks: good}")
    cases = [
        (str(not_json), [], "is not JSON"),
        (write_review(tmp_path / "v2.json", [{"path": line[0], "mark": "good"}], version, format="review/2"), [],
         "is a review of format 'review/2'; this version reads " + REVIEW_FORMAT),
        (write_review(tmp_path / "empty.json", [], version), [], "names no images"),
        (write_review(tmp_path / "defects.json", [{"path": line[0], "mark": "defect"}], version), [],
         "marks no image good (1 marked defect)"),
        (write_review(tmp_path / "bad_mark.json", [{"path": line[0], "mark": "fine"}], version), [],
         "has mark 'fine', not one of good, defect"),
        (write_review(tmp_path / "other.json", [{"path": line[0], "mark": "good"}], "0123456789ab"), [],
         f"was made against model version 0123456789ab, but {model} is version {version}"),
        (write_review(tmp_path / "gone.json", [{"path": p, "mark": "good"} for p in line[:2]]
                      + [{"path": str(tmp_path / f"gone{i}.png"), "mark": "good"} for i in range(5)], version), [],
         f"5 of the 7 images marked good in {tmp_path / 'gone.json'} no longer exist: {tmp_path / 'gone0.png'}, "
         f"{tmp_path / 'gone1.png'}, {tmp_path / 'gone2.png'} and 2 more; nothing was added"),
        (write_review(tmp_path / "cat.json", [{"path": line[0], "mark": "good"}], version), ["--category", "gadget"],
         "marks no image of category gadget good"),
        (str(tmp_path / "absent.json"), [], "review file not found"),
    ]
    before = open(model, "rb").read()
    for review, extra, message in cases:
        with pytest.raises(UserError) as err:
            train_script.main(["--update", "--from_review", review, "--model_path", model, *K10, *extra])
        assert message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--from_review goes with --update"):
        train_script.main(["--from_review", cases[1][0], "--model_path", model, *K10])
    with pytest.raises(UserError, match="--force goes with --from_review"):
        train_script.main(["--update", "--force", "--model_path", model, *K10])
    with pytest.raises(UserError, match="no update equals a fit on the union"):
        train_script.main(["--update", "--from_review", cases[1][0], "--method", "coreset", "--model_path", model,
                           "--resize", "64", "--crop_size", "64", "--no_progress"])
    assert open(model, "rb").read() == before

    # --force takes a review of another version; the new version's parent is the model it updated
    capsys.readouterr()
    assert train_script.main(["--update", "--from_review", cases[5][0], "--force", "--model_path", model, *K10]) == 0
    assert "--force: " in capsys.readouterr().out
    assert load_model(model)["version"]["parent"] == version

    # from the shell: one line on stderr, no traceback
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--update", "--from_review", str(not_json),
                           "--model_path", model, *K10], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_patchcore_model_update_is_refused(tiny_model, tmp_path):
    """A PatchCore model given without --method: the refusal names the reason, before any flag check."""
    import paddle
    from models import MODEL_FORMAT
    path = str(tmp_path / "widget.pdparams")
    paddle.save({"format": MODEL_FORMAT, "config": {"method": "coreset", "arch": "resnet18"}, "stats": {}}, path)
    review = write_review(tmp_path / "r.json", [{"path": os.path.join(tiny_model["line"], "part_000.png"),
                                                 "mark": "good"}], "x")
    with pytest.raises(UserError, match="is a PatchCore model: a PatchCore memory bank is a greedy coreset"):
        train_script.main(["--update", "--from_review", review, "--model_path", path, *K10])
