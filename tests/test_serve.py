"""serve.py as a real uvicorn process on a loopback port, over a small exported OrthoAD model:
parity with infer.py, dynamic batching, bad input, the API key, overload, SIGTERM, and the page
in headless Chromium."""
import base64
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

import export_model
import infer
import train
from conftest import ROOT
from service.launch import ServiceProcess
from test_report import browser  # noqa: F401 - the headless Chromium fixture
from test_transforms import png_header_only

KEY = "test-key-1234"
AUTH = {"X-API-Key": KEY}
TINY = ["--method", "ortho", "--arch", "resnet18", "--k", "8", "--resize", "64", "--crop_size", "64"]
TEST_IMAGES = [("good", "000"), ("good", "001"), ("good", "002"),
               ("broken_large", "000"), ("broken_large", "001"), ("broken_large", "002")]


def start(model_dir, log_path, *flags):
    return ServiceProcess(model_dir, log_path, "--cpu_threads", "2", *flags)


@pytest.fixture(scope="module")
def exported(mvtec_lite, r18_weights, tmp_path_factory):
    """A few bottle images -> a tiny OrthoAD model, exported twice: inference/{bottle,bottle2}."""
    root = tmp_path_factory.mktemp("serve")
    src, data = os.path.join(mvtec_lite, "bottle"), root / "data" / "bottle"
    for sub, names in (("train/good", [f"{i:03d}" for i in range(12)]), ("test/good", ["000", "001", "002"]),
                       ("test/broken_large", ["000", "001", "002"])):
        os.makedirs(data / sub)
        for n in names:
            os.symlink(os.path.join(src, sub, n + ".png"), data / sub / f"{n}.png")
    os.makedirs(data / "ground_truth" / "broken_large")
    for n in ("000", "001", "002"):
        os.symlink(os.path.join(src, "ground_truth", "broken_large", f"{n}_mask.png"),
                   data / "ground_truth" / "broken_large" / f"{n}_mask.png")
    run = str(root / "run")
    # --eval: thresholds F1-optimal on the 6 test images, so that both labels occur (calibrated on
    # one held-out training image instead, the demo data's model flagged all 6)
    assert train.main(["--data_path", str(root / "data"), "--category", "bottle", *TINY, "--backbone_weights",
                       r18_weights, "--save_path", run, "--no_progress", "--eval"]) == 0
    models = root / "inference"
    assert export_model.main([*TINY, "--model_path", os.path.join(run, "bottle.pdparams"),
                              "--save_dir", str(models / "bottle")]) == 0
    shutil.copytree(models / "bottle", models / "bottle2")
    images = [str(data / "test" / d / f"{n}.png") for d, n in TEST_IMAGES]
    return str(models), images


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    srv = start(exported[0], str(tmp_path_factory.mktemp("log") / "serve.log"), "--api_key", KEY,
                 "--max_wait_ms", "100", "--max_batch", "8", "--max_image_mb", "1")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def post(url, data, headers=AUTH, **params):
    return requests.post(url, data=data, headers=headers, params=params, timeout=60)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def metric(server, name, **labels):
    """Value of one series in /metrics (0 if absent)."""
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")):
            series, value = line.rsplit(" ", 1)
            got = series[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want or not labels:
                return float(value)
    return 0.0


def png_array(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# ---------------------------------------------------------------- results
def test_scores_maps_and_masks_equal_infer(server, exported, tmp_path):
    model_dir, images = exported
    out = str(tmp_path / "infer")
    assert infer.main(["--model_dir", os.path.join(model_dir, "bottle"), "--input_file", *images,
                       "--cpu_threads", "2", "--save_path", out]) == 0
    with open(os.path.join(out, "infer_results.jsonl")) as f:
        want = {r["image_path"]: r for r in map(json.loads, f)}
    labels = set()
    for path in images:
        res = post(server.url + "/predict/bottle", read(path), map="true")
        assert res.status_code == 200, res.text
        got, ref = res.json(), want[path]
        assert got["raw_score"] == pytest.approx(ref["raw_score"], rel=1e-6)
        assert (got["pred_score"], got["pred_label"]) == (ref["pred_score"], ref["pred_label"])
        assert (got["category"], got["model"]) == ("bottle", "ortho_resnet18")
        heat = png_array(got["anomaly_map_png"]).astype(np.float32) / 255.0
        np.testing.assert_allclose(heat, np.load(ref["anomaly_map"]), atol=0.5 / 255 + 1e-6, rtol=0)
        np.testing.assert_array_equal(png_array(got["pred_mask_png"]) > 0, np.asarray(Image.open(ref["pred_mask"])) > 0)
        labels.add(got["pred_label"])
        plain = post(server.url + "/predict/bottle2", read(path)).json()  # the second folder: its own worker
        assert plain["raw_score"] == got["raw_score"] and "anomaly_map_png" not in plain
    assert labels == {"normal", "anomalous"}


def test_concurrent_requests_are_batched_with_the_same_scores(server, exported):
    images = exported[1]
    alone = {p: post(server.url + "/predict/bottle", read(p)).json()["raw_score"] for p in images}
    count0, sum0 = metric(server, "anomaly_batch_size_count", category="bottle"), \
        metric(server, "anomaly_batch_size_sum", category="bottle")
    jobs = images * 3
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda p: post(server.url + "/predict/bottle", read(p)), jobs))
    assert [a.status_code for a in answers] == [200] * len(jobs)
    for path, a in zip(jobs, answers):
        assert a.json()["raw_score"] == pytest.approx(alone[path], rel=1e-6)
    batches = metric(server, "anomaly_batch_size_count", category="bottle") - count0
    served = metric(server, "anomaly_batch_size_sum", category="bottle") - sum0
    assert served == len(jobs) and batches < len(jobs), (served, batches)  # some batches held > 1 image
    assert metric(server, "anomaly_batch_size_bucket", category="bottle", le="1.0") < \
        metric(server, "anomaly_batch_size_count", category="bottle")
    assert metric(server, "anomaly_queue_length", category="bottle") == 0  # all answered
    assert metric(server, "anomaly_request_latency_seconds_count", endpoint="predict", category="bottle") >= \
        len(jobs) + len(images)
    assert metric(server, "anomaly_models_ready") == 2


# ---------------------------------------------------------------- bad input
def raw_request(server, headers, body):
    """Send `body` under `headers` (which may announce more); -> (status, JSON) of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/predict/bottle")
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(body)
    res = conn.getresponse()
    out = res.status, json.loads(res.read())
    conn.close()
    return out


def test_bad_input_gets_a_json_error_and_the_service_goes_on(server, exported):
    good = read(exported[1][0])
    errors0 = {s: metric(server, "anomaly_errors_total", endpoint="predict", category="bottle", status=s)
               for s in ("400", "413")}
    cases = [(b"", 400, "empty"), (b"this is not an image", 400, "not an image"),
             (good[: len(good) // 2], 400, "cannot read image"),
             (png_header_only(7000, 7000), 413, "more than the limit"),  # 49 > 40 megapixels: ours
             (png_header_only(100000, 100000), 413, "too large"),  # over twice: Pillow's own guard
             (os.urandom(1024 * 1024 + 10), 413, "over the limit")]
    for body, status, words in cases:
        res = post(server.url + "/predict/bottle", body)
        assert res.status_code == status and words in res.json()["error"], res.text
        assert "Traceback" not in res.text
    # A chunked body (no Content-Length) is counted as it streams.
    res = requests.post(server.url + "/predict/bottle", data=iter([b"\0" * 65536] * 20), headers=AUTH, timeout=60)
    assert res.status_code == 413
    # Content-Length announces 50 MB; 1 KB is sent and the answer comes without the rest.
    status, body = raw_request(server, {**AUTH, "Content-Length": str(50 * 2**20)}, b"\0" * 1024)
    assert status == 413 and "over the limit" in body["error"]
    res = post(server.url + "/predict/no_such_category", good)
    assert res.status_code == 404 and "bottle" in res.json()["error"]
    assert post(server.url + "/predict/bottle", good, map="maybe").status_code == 400
    assert post(server.url + "/predict/bottle", good).status_code == 200
    assert metric(server, "anomaly_errors_total", endpoint="predict", category="bottle", status="400") \
        >= errors0["400"] + 4
    assert metric(server, "anomaly_errors_total", endpoint="predict", category="bottle", status="413") \
        == errors0["413"] + 5
    assert metric(server, "anomaly_errors_total", endpoint="predict", category="unknown", status="404") >= 1


def test_api_key_on_every_request_but_health(server, exported):
    good = read(exported[1][0])
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        for res in (post(server.url + "/predict/bottle", good, headers=headers),
                    requests.get(server.url + "/models", headers=headers, timeout=10),
                    requests.get(server.url + "/metrics", headers=headers, timeout=10)):
            assert res.status_code == 401 and "API key" in res.json()["error"]
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    assert post(server.url + "/predict/bottle", good, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    models = requests.get(server.url + "/models", headers=AUTH, timeout=10).json()["models"]
    assert [(m["category"], m["method"], m["arch"], m["input_shape"]) for m in models] == \
        [("bottle", "ortho", "resnet18", [3, 64, 64]), ("bottle2", "ortho", "resnet18", [3, 64, 64])]
    assert metric(server, "anomaly_errors_total", endpoint="models", category="", status="401") >= 3


def test_other_hosts_need_a_key_or_no_auth(exported, monkeypatch):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", exported[0],
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "AD_API_KEY"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: --host 0.0.0.0") and \
        len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    import serve
    for flags in (["--host", "10.0.0.1", "--api_key", "k"], ["--host", "10.0.0.1", "--no_auth"], []):
        serve.check_args(serve.build_parser().parse_args(["--model_dir", "m", *flags]))  # accepted
    monkeypatch.setenv("AD_API_KEY", "from-env")
    args = serve.build_parser().parse_args(["--model_dir", "m", "--host", "10.0.0.1"])
    serve.check_args(args)
    assert args.api_key == "from-env"


def test_overload_then_sigterm_answers_the_request_in_flight(exported, tmp_path):
    """A batch waits 2 s for company: two requests fill the queue, two more get 503; then
    SIGTERM while a request waits: it is answered and the process exits 0."""
    srv = start(exported[0], str(tmp_path / "serve.log"), "--max_queue", "2", "--max_wait_ms", "2000")
    try:
        srv.wait_ready()
        good = read(exported[1][0])
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(srv.url + "/predict/bottle", good, headers={}), range(4)))
        assert sorted(a.status_code for a in answers) == [200, 200, 503, 503]
        refused = [a for a in answers if a.status_code == 503]
        assert all(a.headers["Retry-After"] == "1" and "overloaded" in a.json()["error"] for a in refused)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, srv.url + "/predict/bottle", good, {})
            deadline = time.time() + 1.5
            while metric(srv, "anomaly_queue_length", category="bottle") < 1 and time.time() < deadline:
                time.sleep(0.02)  # until the server holds it (it waits up to 2 s for a batch)
            assert not in_flight.done()
            srv.proc.send_signal(signal.SIGTERM)
            assert in_flight.result().status_code == 200
        assert srv.proc.wait(60) == 0, srv.log()
    finally:
        srv.stop()


def test_model_dir_is_one_export_or_a_folder_of_them(exported, tmp_path):
    from service.workers import find_model_dirs
    from utils import UserError
    root = exported[0]
    assert find_model_dirs(root) == {"bottle": os.path.join(root, "bottle"), "bottle2": os.path.join(root, "bottle2")}
    assert find_model_dirs(os.path.join(root, "bottle2")) == {"bottle": os.path.join(root, "bottle2")}  # its category
    with pytest.raises(UserError, match="no exported model in"):
        find_model_dirs(str(tmp_path))


def in_process_app(exported):
    """The app over a worker that is never started (no lifespan runs): -> (client, worker, metrics)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.workers import ModelWorker
    metrics = ServiceMetrics(["bottle"], 8)
    worker = ModelWorker("bottle", os.path.join(exported[0], "bottle"), {"cpu_threads": 1}, metrics)
    return TestClient(create_app({"bottle": worker}, metrics=metrics)), worker, metrics


def test_worker_batches_what_waits_and_drains_its_queue_when_stopped(exported):
    """Requests that waited longer than --max_wait_ms form batches of up to --max_batch at once;
    after stop() every queued request is still answered, in order."""
    from service.metrics import ServiceMetrics
    from service.workers import ModelWorker

    class Doubling:  # stands in for the Detector: the image's first pixel, twice, as its score
        def raw(self, images):
            return 2 * images[:, 0, 0, 0], images[:, 0]

        def calibrated(self, scores, maps):
            return [{"raw_score": float(v), "pred_score": 0.0, "pred_label": 0} for v in scores]

    metrics = ServiceMetrics(["bottle"], 4)
    worker = ModelWorker("bottle", os.path.join(exported[0], "bottle"), {}, metrics, max_batch=4, max_wait_ms=0)
    worker.detector = Doubling()
    futures = [worker.submit(np.full((3, 2, 2), i, np.float32)) for i in range(10)]
    worker.stop()  # queued behind the ten; the thread was never started: its loop runs here
    while worker._serve_batch():
        pass
    assert [f.result(0)["raw_score"] for f in futures] == [2.0 * i for i in range(10)]
    assert b'anomaly_batch_size_count{category="bottle"} 3.0' in metrics.exposition()  # 4 + 4 + 2


def test_health_is_503_until_every_model_has_loaded(exported):
    client, _, _ = in_process_app(exported)
    res = client.get("/health")
    assert res.status_code == 503 and res.json() == {"status": "loading", "loading": ["bottle"]}
    assert client.post("/predict/bottle", content=read(exported[1][0])).status_code == 503


def test_an_internal_error_is_logged_not_shown(exported, caplog):
    class Broken:
        def decode(self, *args):
            raise RuntimeError("secret internals /path/to/something")

    client, worker, metrics = in_process_app(exported)
    worker.ready.set()
    worker.preprocess = Broken()
    res = client.post("/predict/bottle", content=b"x")
    assert res.status_code == 500 and res.json() == {"error": "internal error"}
    assert "secret internals" in caplog.text and "Traceback" in caplog.text  # the server's log has it all
    assert b'anomaly_errors_total{category="bottle",endpoint="predict",status="500"} 1.0' in metrics.exposition()


# ---------------------------------------------------------------- the page
def test_page_scores_an_uploaded_and_a_dropped_image_in_chromium(server, exported, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    path = exported[1][3]
    want = post(server.url + "/predict/bottle", read(path)).json()
    browser.get(server.url + "/")
    assert "src=\"http" not in browser.page_source  # self-contained: nothing fetched from elsewhere
    browser.find_element(By.ID, "apikey").send_keys(KEY)
    browser.execute_script("document.getElementById('apikey').dispatchEvent(new Event('change'))")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.state") == "ready")
    browser.find_element(By.ID, "file").send_keys(path)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.state") in
                                     ("done", "error"))
    assert browser.execute_script("return document.body.dataset.state") == "done", \
        browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "score").text == f"{want['pred_score']:.4f}"
    assert want["pred_label"] in browser.find_element(By.ID, "result").text
    size = browser.execute_script("const c = document.getElementById('heatmap'); return [c.width, c.height]")
    assert size == [64, 64]
    assert browser.execute_script("const m = document.getElementById('mask'); return m.complete && m.naturalWidth") \
        == 64
    # Dropped on the page (a drop event carrying the file, as the browser makes for a dragged file).
    other = exported[1][0]
    want = post(server.url + "/predict/bottle", read(other)).json()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    """, base64.b64encode(read(other)).decode())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
    assert browser.find_element(By.ID, "score").text == f"{want['pred_score']:.4f}"
    assert want["pred_label"] in browser.find_element(By.ID, "result").text
