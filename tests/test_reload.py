"""Hot reload of serve.py as a real uvicorn process (service/reload.py): answers switch from
version A to B under concurrent requests with none failing; a model that fails to load keeps A
serving; SIGHUP, POST /admin/reload with and without the key; a deleted export folder; an export
killed midway is never loaded. Also: the model version is the same in predict.py's and infer.py's
lines and the service's answers."""
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

import export_model
import infer
import predict
import train
from conftest import ROOT
from deploy.export import publish_export
from deploy.predictor import STATS_FILE, load_stats
from models import load_model
from test_serve import AUTH, KEY, TINY, metric, post, read, start


def bottle_subset(src, dst, train_names, test_names=()):
    for sub, names in (("train/good", train_names), ("test/good", test_names)):
        os.makedirs(os.path.join(dst, sub))
        for n in names:
            os.symlink(os.path.join(src, sub, n + ".png"), os.path.join(dst, sub, n + ".png"))


@pytest.fixture(scope="module")
def versions(mvtec_lite, r18_weights, tmp_path_factory):
    """Version A: a tiny OrthoAD bottle model (--keep_sums); version B: A after --update with four
    more good images. Both exported; the served folder models/bottle starts as A."""
    root = tmp_path_factory.mktemp("reload")
    src = os.path.join(mvtec_lite, "bottle")
    bottle_subset(src, str(root / "a" / "bottle"), [f"{i:03d}" for i in range(12)], ["000", "001"])
    bottle_subset(src, str(root / "b" / "bottle"), [f"{i:03d}" for i in range(12, 16)])
    run_a, run_b = str(root / "run_a"), str(root / "run_b")
    assert train.main(["--data_path", str(root / "a"), "--category", "bottle", *TINY, "--backbone_weights",
                       r18_weights, "--save_path", run_a, "--keep_sums", "--no_progress"]) == 0
    shutil.copytree(run_a, run_b)
    assert train.main(["--update", "--data_path", str(root / "b"), "--category", "bottle", *TINY,
                       "--backbone_weights", r18_weights, "--save_path", run_b, "--no_progress"]) == 0
    exports = {}
    for name, run in (("A", run_a), ("B", run_b)):
        exports[name] = str(root / "exports" / name)
        assert export_model.main([*TINY, "--model_path", os.path.join(run, "bottle.pdparams"),
                                  "--save_dir", exports[name]]) == 0
    ids = {name: load_stats(os.path.join(d, STATS_FILE))[0]["version"]["id"] for name, d in exports.items()}
    assert ids["A"] != ids["B"] and load_model(os.path.join(run_b, "bottle.pdparams"))["version"]["parent"] == ids["A"]
    served = str(root / "models" / "bottle")
    publish_export(exports["A"], served)
    images = [os.path.join(src, "test", d, n + ".png") for d, n in (("good", "000"), ("broken_large", "000"))]
    return {"root": root, "exports": exports, "ids": ids, "served": served, "runs": {"A": run_a, "B": run_b},
            "images": images}


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    srv = start(os.path.dirname(versions["served"]), str(tmp_path_factory.mktemp("log") / "serve.log"),
                "--api_key", KEY, "--max_wait_ms", "20")
    try:
        yield srv.wait_ready()
    finally:
        publish_export(versions["exports"]["A"], versions["served"])
        srv.stop()


def serving(srv):
    (model,) = requests.get(srv.url + "/models", headers=AUTH, timeout=10).json()["models"]
    return model


def reload(srv, path="/admin/reload/bottle", headers=AUTH):
    return requests.post(srv.url + path, headers=headers, timeout=120)


def wait_for(condition, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- one version everywhere
def test_the_version_is_the_same_in_predict_infer_and_the_service(server, versions, tmp_path, capsys):
    image = versions["images"][1]
    assert predict.main([image, "--category", "bottle", *TINY, "--model_path", versions["runs"]["A"],
                         "--output_dir", str(tmp_path / "p"), "--no_progress"]) == 0
    predicted = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
    assert infer.main(["--model_dir", versions["exports"]["A"], "--input_file", image, "--save_path",
                       str(tmp_path / "i")]) == 0
    with open(tmp_path / "i" / "infer_results.jsonl") as f:
        inferred = json.loads(f.readline())
    answer = post(server.url + "/predict/bottle", read(image)).json()
    model = serving(server)
    with open(os.path.join(versions["runs"]["A"], "metrics", "bottle.json")) as f:
        trained = json.load(f)
    assert predicted["model_version"] == inferred["model_version"] == answer["model_version"] == \
        model["model_version"] == model["version"]["id"] == trained["model_version"] == versions["ids"]["A"]
    assert answer["pred_label"] == inferred["pred_label"] and answer["raw_score"] == pytest.approx(inferred["raw_score"])


# ---------------------------------------------------------------- reloads under load
def test_answers_switch_from_a_to_b_under_load_with_no_failure(server, versions):
    ids, bodies = versions["ids"], [read(p) for p in versions["images"]]
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def client(i):
        session = requests.Session()
        while not stop.is_set():
            sent = time.perf_counter()
            res = session.post(server.url + "/predict/bottle", data=bodies[i % 2], headers=AUTH, timeout=60)
            with lock:
                answers.append((sent, time.perf_counter(), res.status_code, res.json().get("model_version")))

    reloads = []  # (published, reload answered, name, status, body)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, i) for i in range(4)]
        try:
            for name in ("B", "A", "B", "A", "B"):
                time.sleep(0.3)
                published = time.perf_counter()
                publish_export(versions["exports"][name], versions["served"])
                res = reload(server)
                reloads.append((published, time.perf_counter(), name, res.status_code, res.json()))
            wait_for(lambda: sum(sent > reloads[-1][1] for sent, *_ in list(answers)) >= 4,
                     what="answers after the last reload")
        finally:
            stop.set()
            for c in clients:
                c.result()
    assert [(code, body["results"][0]["result"], body["results"][0]["model_version"]) for *_, code, body in reloads] \
        == [(200, "reloaded", ids[name]) for _, _, name, _, _ in reloads]
    assert len(answers) > 20 and {code for *_, code, _ in answers} == {200}
    assert {v for *_, v in answers} == {ids["A"], ids["B"]}
    # Every request sent after a reload has answered, and answered before the next export was
    # published, comes from the new model (the swap precedes the reload's reply).
    for i, (_, done, name, _, _) in enumerate(reloads):
        until = reloads[i + 1][0] if i + 1 < len(reloads) else float("inf")
        between = [v for sent, answered, _, v in answers if sent > done and answered < until]
        assert set(between) <= {ids[name]}, (name, between)
    assert sum(sent > reloads[-1][1] for sent, *_ in answers) >= 4
    model = serving(server)
    assert model["model_version"] == ids["B"] and model["version"]["parent"] == ids["A"]
    assert model["reload"]["last"]["result"] == "reloaded" and model["reload"]["failed"] is None
    assert metric(server, "anomaly_reloads_total", category="bottle", result="reloaded") >= 5
    assert metric(server, "anomaly_model_version_info", category="bottle", version=ids["B"], parent=ids["A"]) == 1
    # Reloading an unchanged folder does nothing.
    assert reload(server).json()["results"][0]["result"] == "unchanged"


def test_sighup_and_admin_reload_with_and_without_the_key(server, versions):
    ids = versions["ids"]
    publish_export(versions["exports"]["A"], versions["served"])
    for path in ("/admin/reload", "/admin/reload/bottle"):
        for headers in ({}, {"X-API-Key": "wrong"}):
            res = reload(server, path, headers)
            assert res.status_code == 401 and "API key" in res.json()["error"]
    assert serving(server)["model_version"] == ids["B"]  # refused: nothing reloaded
    # Two reloads at once: the second waits for the first, then finds the folder already serving.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda path: reload(server, path), ["/admin/reload", "/admin/reload/bottle"]))
    assert [r.status_code for r in both] == [200, 200]
    results = [r.json()["results"][0] for r in both]
    assert sorted(r["result"] for r in results) == ["reloaded", "unchanged"]
    assert {r["model_version"] for r in results} == {ids["A"]}
    publish_export(versions["exports"]["B"], versions["served"])
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: serving(server)["model_version"] == ids["B"], what="the SIGHUP reload")
    assert serving(server)["reload"]["last"]["trigger"] == "SIGHUP"
    assert post(server.url + "/predict/bottle", read(versions["images"][0])).json()["model_version"] == ids["B"]
    res = reload(server, "/admin/reload/no_such_category")
    assert res.status_code == 404 and "bottle" in res.json()["error"]


def test_a_failing_new_model_keeps_the_old_one_serving(server, versions, tmp_path):
    ids, served = versions["ids"], versions["served"]
    before = serving(server)["model_version"]
    # An export whose statistics do not fit its network: it loads, and fails its warm-up image.
    broken = tmp_path / "broken"
    shutil.copytree(versions["exports"]["A"], broken)
    meta, stats = load_stats(str(broken / STATS_FILE))
    with open(broken / STATS_FILE, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                 **{f"stats/{k}": v[..., :3] if k == "mean" else v for k, v in stats.items()})
    publish_export(str(broken), served)
    lines_before = server.log().count("failed")
    res = reload(server)
    assert res.status_code == 422 and "bottle" in res.json()["error"], res.text
    assert res.json()["results"][0]["model_version"] == before
    assert post(server.url + "/predict/bottle", read(versions["images"][0])).json()["model_version"] == before
    model = serving(server)
    assert model["model_version"] == before and "do not fit" in model["reload"]["failed"]["error"]
    assert metric(server, "anomaly_reload_failed", category="bottle") == 1
    assert metric(server, "anomaly_reloads_total", category="bottle", result="failed") >= 1
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "degraded" and "reload failed" in health["problems"]["bottle"]
    log_lines = [line for line in server.log().splitlines() if "failed" in line]
    assert server.log().count("failed") == lines_before + 1 and "keeps serving" in log_lines[-1]
    # The export folder deleted while serving: the loaded model goes on; /health says what happened.
    shutil.rmtree(served)
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and "missing" in health.json()["problems"]["bottle"]
    assert post(server.url + "/predict/bottle", read(versions["images"][1])).status_code == 200
    assert reload(server).status_code == 422
    publish_export(versions["exports"]["A"], served)
    assert reload(server).json()["results"][0]["model_version"] == ids["A"]
    assert metric(server, "anomaly_reload_failed", category="bottle") == 0
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok", "models": ["bottle"]}


def test_a_replaced_worker_admits_no_more_requests(versions):
    """The reload closes the worker it replaced: a request that looked it up and yielded before
    being admitted (the app never does) gets a 503 to send again, never a queue nobody serves."""
    from service.metrics import ServiceMetrics
    from service.workers import ModelWorker, Overloaded
    worker = ModelWorker("bottle", versions["exports"]["A"], {}, ServiceMetrics(["bottle"], 8))
    worker.admit()
    worker.close()
    with pytest.raises(Overloaded, match="replaced by a reload"):
        worker.admit()
    assert worker.admitted == 1  # the one admitted before is still answered
    worker.release()
    assert worker.admitted == 0


# ---------------------------------------------------------------- --watch and export_model.py
KILLED_EXPORT = """
import os, signal, sys
import numpy as np
sys.argv = sys.argv[1:]
real_savez = np.savez
def savez_then_die(f, **arrays):  # the network is written, the statistics half written: killed
    f.write(b"PK\\x03\\x04 half a file")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = savez_then_die
import export_model
export_model.main(sys.argv[1:])
"""


def test_watch_loads_a_new_export_and_never_an_interrupted_one(versions, tmp_path):
    ids, served = versions["ids"], versions["served"]
    publish_export(versions["exports"]["A"], served)
    srv = start(os.path.dirname(served), str(tmp_path / "serve.log"), "--watch", "0.1")
    try:
        model_b = os.path.join(versions["runs"]["B"], "bottle.pdparams")
        killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, "export_model.py", *TINY, "--model_path",
                                 model_b, "--save_dir", served], cwd=ROOT, capture_output=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        srv.wait_ready()  # (started beside the export: both import Paddle at once)
        leftovers = [n for n in os.listdir(os.path.dirname(served)) if n != "bottle"]
        assert len(leftovers) == 1 and leftovers[0].startswith(".bottle.")  # the half export, beside
        time.sleep(1.0)  # ten polls
        model = requests.get(srv.url + "/models", timeout=10).json()["models"]
        assert [m["model_version"] for m in model] == [ids["A"]]
        assert metric(srv, "anomaly_reloads_total", category="bottle", result="reloaded") == 0
        assert metric(srv, "anomaly_reloads_total", category="bottle", result="failed") == 0
        assert requests.get(srv.url + "/health", timeout=10).json()["status"] == "ok"
        # A complete export into the same folder goes live by itself.
        assert export_model.main([*TINY, "--model_path", model_b, "--save_dir", served]) == 0
        wait_for(lambda: post(srv.url + "/predict/bottle", read(versions["images"][0]), {}).json()["model_version"]
                 == ids["B"], what="the watcher's reload")
        assert requests.get(srv.url + "/models", timeout=10).json()["models"][0]["reload"]["last"]["trigger"] == \
            "watch"
        assert "reload of bottle (watch): reloaded" in srv.log()
        # A new category folder goes live by itself too; one that cannot be loaded is shown, not served.
        root = os.path.dirname(served)
        assert post(srv.url + "/predict/second", read(versions["images"][0]), {}).status_code == 404
        publish_export(versions["exports"]["A"], os.path.join(root, "second"))
        os.makedirs(os.path.join(root, "broken"))
        with open(os.path.join(root, "broken", STATS_FILE), "wb") as f:
            f.write(b"not a stats file")
        wait_for(lambda: post(srv.url + "/predict/second", read(versions["images"][0]), {}).status_code == 200,
                 what="the new category")
        answer = post(srv.url + "/predict/second", read(versions["images"][1]), {}).json()
        assert answer["model_version"] == ids["A"] and answer["pred_label"] == "anomalous"
        models = {m["category"]: m for m in requests.get(srv.url + "/models", timeout=10).json()["models"]}
        assert sorted(models) == ["bottle", "second"] and models["second"]["reload"]["last"]["result"] == "added"
        assert metric(srv, "anomaly_reloads_total", category="second", result="added") == 1
        assert metric(srv, "anomaly_models_ready") == 2
        health = requests.get(srv.url + "/health", timeout=10).json()
        assert health["status"] == "degraded" and health["models"] == ["bottle", "second"]
        assert "could not be loaded (no static model" in health["problems"]["broken"]
        assert "new category broken (watch) not served" in srv.log()
        assert srv.log().count("new category broken") == 1  # --watch tries it again only once it changes
        res = reload(srv, "/admin/reload/broken", {})  # asked for: tried again
        assert res.status_code == 422 and res.json()["results"][0]["result"] == "failed", res.text
        assert reload(srv, "/admin/reload/nothing_there", {}).status_code == 404
        shutil.rmtree(os.path.join(root, "broken"))
        wait_for(lambda: requests.get(srv.url + "/health", timeout=10).json()["status"] == "ok",
                 what="health after the broken folder went")
    finally:
        srv.stop()
        for name in os.listdir(os.path.dirname(served)):
            if name != "bottle":
                shutil.rmtree(os.path.join(os.path.dirname(served), name))
