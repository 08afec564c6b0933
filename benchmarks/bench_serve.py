"""Load test of serve.py: OrthoAD R18 (k=100) trained on bottle and exported into a temporary
folder, served on 127.0.0.1, the bottle test images posted by concurrent clients. Prints errors,
throughput, latency percentiles and the server's RSS after the first 50 requests and at the end,
for --max_batch 8 and --max_batch 1, beside `infer.py --batch_size 8` over the same images in the
same run (before and after the services, averaged). Prints figures; asserts nothing.

With --reload_every N: two versions of the model (A, and A --update'd with more images) take
turns in the served folder, hot-reloaded every N answers (8 reloads) under the same load: failed
requests, the versions answered, p50/p99 during reloads and steady, RSS after the first and the
last reload.

    python benchmarks/bench_serve.py [--requests 400] [--clients 8] [--max_seconds 300]
    python benchmarks/bench_serve.py --reload_every 50
    python benchmarks/bench_serve.py --requests 40 --train_images 12 --resize 64 --crop_size 64 --k 8  # quick
    python benchmarks/bench_serve.py --precision fp32,bf16   # each fitted, exported and served in one run
"""
import argparse
import contextlib
import io
import json
import os
import pathlib
import shutil
import tempfile
import threading
import time

import numpy as np
import requests

from common import DATA, WEIGHTS, cpu_header, precisions_to_run, require_shared

import export_model  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from datasets import test_samples  # noqa: E402
from deploy.export import publish_export  # noqa: E402
from deploy.predictor import STATS_FILE, load_stats  # noqa: E402
from service.launch import ServiceProcess  # noqa: E402
from utils import format_table  # noqa: E402

RSS_AFTER = 50
RELOADS = 8


def training_data(tmp, n_images):
    """DATA, or a copy of bottle (symlinks) with only its first `n_images` train images."""
    if not n_images:
        return DATA
    return bottle_subset(tmp, "data", lambda names: names[:n_images])


def bottle_subset(tmp, name, keep):
    """<tmp>/<name>/bottle: bottle's test set and the train images `keep(sorted names)` (symlinks)."""
    src, root = os.path.join(DATA, "bottle"), os.path.join(tmp, name)
    dst = os.path.join(root, "bottle")
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        kept = keep(sorted(files)) if rel == os.path.join("train", "good") else files
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in kept:
            os.symlink(os.path.join(dirpath, f), os.path.join(dst, rel, f))
    return root


def fit_and_export(data, tmp, flags, threads, precision="fp32"):
    """A bottle model (`flags`) fitted at `precision` on `data` and exported under `tmp` -> the
    export folder."""
    run = os.path.join(tmp, f"run_{precision}")
    train.main(["--data_path", data, "--category", "bottle", *flags, "--backbone_weights", WEIGHTS,
                "--save_path", run, "--no_progress", "--cpu_threads", str(threads), "--precision", precision])
    model_dir = os.path.join(tmp, f"inference_{precision}", "bottle")
    export_model.main([*flags, "--model_path", os.path.join(run, "bottle.pdparams"), "--save_dir", model_dir])
    return model_dir


def load_test(url, bodies, n_requests, clients, max_seconds, on_count, on_answer=None, stop=None):
    """`clients` threads post bodies in turn until `n_requests` are answered, time runs out or
    `stop` (an Event) is set; -> (latencies in s of the 200s, error count, wall seconds, timed
    out). `on_answer(t0, t1, response or None)` sees each answer."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": 0}
    latencies = []
    stop_at = time.perf_counter() + max_seconds

    def client():
        session = requests.Session()
        while time.perf_counter() < stop_at and not (stop and stop.is_set()):
            with lock:
                i = state["next"]
                if i >= n_requests:
                    return
                state["next"] += 1
            t0 = time.perf_counter()
            try:
                res = session.post(url, data=bodies[i % len(bodies)], timeout=60)
            except requests.RequestException:
                res = None
            ok = res is not None and res.status_code == 200
            seconds = time.perf_counter() - t0
            if on_answer:
                on_answer(t0, t0 + seconds, res)
            with lock:
                state["done"] += 1
                if ok:
                    latencies.append(seconds)
                else:
                    state["errors"] += 1
                done = state["done"]
            on_count(done)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return latencies, state["errors"], wall, state["next"] < n_requests and not (stop and stop.is_set())


def batch_totals(url):
    """(images, batches) run so far, from /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("anomaly_batch_size_sum", "anomaly_batch_size_count"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("anomaly_batch_size_sum", 0.0), values.get("anomaly_batch_size_count", 0.0)


def run_service(model_dir, log_path, bodies, args, max_batch):
    srv = ServiceProcess(model_dir, log_path, "--cpu_threads", str(args.threads), "--max_batch", str(max_batch),
                         "--max_wait_ms", str(args.max_wait_ms))
    try:
        srv.wait_ready()
        url = srv.url + "/predict/bottle"
        # Warm-up (not counted): every batch size the run will meet has been through oneDNN once.
        load_test(url, bodies, 4 * args.clients, args.clients, 120, lambda n: None)
        rss = {}
        images0, batches0 = batch_totals(srv.url)

        def on_count(n):
            if n == RSS_AFTER:
                rss["first"] = srv.rss_mb()

        latencies, errors, wall, timed_out = load_test(url, bodies, args.requests, args.clients,
                                                       args.max_seconds, on_count)
        rss["end"] = srv.rss_mb()
        images, batches = batch_totals(srv.url)
        mean_batch = (images - images0) / max(batches - batches0, 1)
    finally:
        code = srv.stop()
    ms = 1000 * np.asarray(latencies or [np.nan])
    return {"config": f"serve.py --max_batch {max_batch}", "answered": len(latencies), "errors": errors,
            "seconds": wall, "images_s": len(latencies) / wall, "p50": np.percentile(ms, 50),
            "p95": np.percentile(ms, 95), "p99": np.percentile(ms, 99), "batch": mean_batch,
            "rss_first": rss.get("first", float("nan")), "rss_end": rss["end"], "exit": code, "timed_out": timed_out}


def run_infer(model_dir, paths, tmp, args, tag):
    """infer.py --batch_size 8 over the images: its own per-image total (preprocess + network +
    scoring), warm-up batch left out, as images/s."""
    log = os.path.join(tmp, f"infer_{tag}.log")
    with contextlib.redirect_stdout(io.StringIO()):  # a JSON line per image
        infer.main(["--model_dir", model_dir, "--input_file", *paths, "--batch_size", "8", "--cpu_threads",
                    str(args.threads), "--enable_benchmark", "True", "--save_path",
                    os.path.join(tmp, f"infer_{tag}"), "--save_log_path", log])
    with open(log) as f:
        report = json.loads(f.read().splitlines()[-1])
    return 1000.0 / report["total_time_ms"]


def precision_figures(precision, data, paths, bodies, flags, tmp, args):
    """Fit at `precision`, export, and serve it (--max_batch 8 and 1) between two infer.py runs
    -> (service rows, infer.py images/s)."""
    model_dir = fit_and_export(data, tmp, flags, args.threads, precision)
    # infer.py before and after the services: a drift of the machine's speed lands on both sides.
    infer_before = run_infer(model_dir, paths, tmp, args, f"before_{precision}")
    rows = [run_service(model_dir, os.path.join(tmp, f"serve{b}_{precision}.log"), bodies, args, b) for b in (8, 1)]
    return rows, (infer_before + run_infer(model_dir, paths, tmp, args, f"after_{precision}")) / 2


# ---------------------------------------------------------------- --reload_every
def two_versions(tmp, flags, args):
    """Version A: fitted (--keep_sums) on the first half of bottle's train images; version B: A
    after train.py --update with the other half (B's parent is A). -> {name: export folder}, test images."""
    half = len(os.listdir(os.path.join(DATA, "bottle", "train", "good"))) // 2
    data_a = bottle_subset(tmp, "data_a", lambda names: names[:half])
    data_b = bottle_subset(tmp, "data_b", lambda names: names[half:])
    common = [*flags, "--backbone_weights", WEIGHTS, "--no_progress", "--cpu_threads", str(args.threads)]
    run_a, run_b = os.path.join(tmp, "run_a"), os.path.join(tmp, "run_b")
    train.main(["--data_path", data_a, "--category", "bottle", *common, "--save_path", run_a, "--keep_sums"])
    shutil.copytree(run_a, run_b)
    train.main(["--update", "--data_path", data_b, "--category", "bottle", *common, "--save_path", run_b])
    exports = {}
    for name, run in (("A", run_a), ("B", run_b)):
        exports[name] = os.path.join(tmp, "exports", name)
        export_model.main([*flags, "--model_path", os.path.join(run, "bottle.pdparams"), "--save_dir", exports[name]])
    return exports, [s.image_path for s in test_samples(data_a, "bottle")]


def serve_with_reloads(exports, served, log_path, bodies, args):
    """The load test while the served folder gets the other version (deploy.export.publish_export)
    and POST /admin/reload/bottle makes it live, `reload_every` answers after the previous reload
    returned, 8 times; the load goes on for `reload_every` answers after the last (and to at least
    --requests). -> per-answer (t0, t1, ok, version), reload windows, RSS after each reload, exit code."""
    versions = {name: load_stats(os.path.join(d, STATS_FILE))[0]["version"]["id"] for name, d in exports.items()}
    publish_export(exports["A"], served)
    srv = ServiceProcess(os.path.dirname(served), log_path, "--cpu_threads", str(args.threads),
                         "--max_batch", "8", "--max_wait_ms", str(args.max_wait_ms))
    answers, windows, rss_after, lock = [], [], [], threading.Lock()
    stop, finished = threading.Event(), threading.Event()

    def on_answer(t0, t1, res):
        version = res.json().get("model_version") if res is not None and res.status_code == 200 else None
        with lock:
            answers.append((t0, t1, version is not None, version))

    def wait_answers(count):
        while len(answers) < count and not finished.is_set():
            time.sleep(0.01)
        return not finished.is_set()

    def reloads():
        next_at = args.reload_every
        while len(windows) < RELOADS and wait_answers(next_at):
            if windows:
                rss_after.append(srv.rss_mb())  # the previous reload's old model has retired by now
            name = "B" if len(windows) % 2 == 0 else "A"
            publish_export(exports[name], served)
            n, t0 = len(answers), time.perf_counter()
            res = requests.post(srv.url + "/admin/reload/bottle", timeout=300)
            result = res.json().get("results", [{}])[0]
            windows.append((t0, time.perf_counter(), n, name, res.status_code, result.get("result")))
            next_at = len(answers) + args.reload_every
        if wait_answers(max(next_at, args.requests)):
            stop.set()

    try:
        srv.wait_ready()
        url = srv.url + "/predict/bottle"
        load_test(url, bodies, 4 * args.clients, args.clients, 120, lambda n: None)  # warm-up, not counted
        reloader = threading.Thread(target=reloads)
        reloader.start()
        _, _, wall, timed_out = load_test(url, bodies, 10**9, args.clients, args.max_seconds, lambda n: None,
                                          on_answer, stop)
        finished.set()
        reloader.join()
        time.sleep(1.0)  # the last reload's old model retires
        rss_after.append(srv.rss_mb())
    finally:
        code = srv.stop()
    return {"answers": answers, "windows": windows, "rss_after": rss_after, "versions": versions, "wall": wall,
            "timed_out": timed_out, "exit": code}


def print_reload_run(run, args):
    answers, windows, versions = run["answers"], run["windows"], run["versions"]
    during = [any(w0 <= t1 and t0 <= w1 for w0, w1, *_ in windows) for t0, t1, _, _ in answers]
    failed = sum(1 for *_, ok, _ in answers if not ok)
    seen = {v for *_, v in answers if v is not None}
    print(f"\nOrthoAD R18 k={args.k} bottle, {args.resize}->{args.crop_size} px: {len(answers)} requests from "
          f"{args.clients} clients, version A <-> B every {args.reload_every} answers ({len(windows)} reloads), "
          f"--cpu_threads {args.threads}, {os.cpu_count()} CPUs{' (TIMED OUT)' if run['timed_out'] else ''}")
    rows = []
    for name, pick in (("steady", False), ("during a reload", True)):
        ms = 1000 * np.array([t1 - t0 for (t0, t1, ok, _), d in zip(answers, during) if ok and d == pick] or [np.nan])
        rows.append([name, int(np.sum(np.isfinite(ms))), f"{np.percentile(ms, 50):.0f}", f"{np.percentile(ms, 99):.0f}"])
    print(format_table(["answers", "count", "p50 ms", "p99 ms"], rows))
    print(format_table(["reload", "after answer", "to", "HTTP", "result", "seconds"],
                       [[i + 1, n, name, code, result, f"{w1 - w0:.2f}"]
                        for i, (w0, w1, n, name, code, result) in enumerate(windows)]))
    rss = run["rss_after"]
    print(f"failed requests: {failed}   versions answered: "
          f"{', '.join(f'{k}={v}' for k, v in versions.items() if v in seen)}"
          f"{'   OTHER: ' + ', '.join(seen - set(versions.values())) if seen - set(versions.values()) else ''}")
    if len(rss) >= 2:
        print(f"RSS after reload 1: {rss[0]:.0f} MB, after reload {len(rss)}: {rss[-1]:.0f} MB "
              f"({100 * (rss[-1] / rss[0] - 1):+.1f}%; issue: within 5%)   exit code {run['exit']}")
        print(f"RSS after each reload, MB: {' '.join(f'{v:.0f}' for v in rss)}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max_seconds", type=float, default=300, help="per service run")
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop_size", type=int, default=224)
    p.add_argument("--train_images", type=int, default=0, help="first N bottle train images (0: all)")
    p.add_argument("--precision", default="fp32",
                   help="comma list of fp32, bf16, int8: the model fitted and served at each one this CPU runs "
                        "natively (the others are skipped with a line saying what the CPU lacks)")
    p.add_argument("--reload_every", type=int, default=0,
                   help=f"instead: hot reloads between two versions every N answers ({RELOADS} reloads)")
    args = p.parse_args()
    require_shared()
    print(cpu_header())
    precisions = precisions_to_run(args.precision)
    if not precisions:
        return 0
    flags = ["--method", "ortho", "--arch", "resnet18", "--k", str(args.k), "--resize", str(args.resize),
             "--crop_size", str(args.crop_size)]
    if args.reload_every:
        with tempfile.TemporaryDirectory() as tmp:
            exports, paths = two_versions(tmp, flags, args)
            bodies = [pathlib.Path(path).read_bytes() for path in paths]
            run = serve_with_reloads(exports, os.path.join(tmp, "served", "bottle"), os.path.join(tmp, "serve.log"),
                                     bodies, args)
        print_reload_run(run, args)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = training_data(tmp, args.train_images)
        paths = [s.image_path for s in test_samples(data, "bottle")]
        bodies = []
        for path in paths:
            with open(path, "rb") as f:
                bodies.append(f.read())
        for precision in precisions:
            results[precision] = precision_figures(precision, data, paths, bodies, flags, tmp, args)
    print(f"\nOrthoAD R18 k={args.k} bottle, {args.resize}->{args.crop_size} px, {len(paths)} test images, "
          f"{args.requests} requests from {args.clients} clients, --cpu_threads {args.threads}, "
          f"--max_wait_ms {args.max_wait_ms}, {os.cpu_count()} CPUs")
    header = ["config", "answered", "errors", "s", "img/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
              f"RSS@{RSS_AFTER} MB", "RSS end MB", "RSS growth", "exit"]
    table = []
    for precision, (rows, infer_rate) in results.items():
        at = "" if len(results) == 1 else f" ({precision})"
        table += [[r["config"] + at + (" (TIMED OUT)" if r["timed_out"] else ""), r["answered"], r["errors"],
                   f"{r['seconds']:.1f}", f"{r['images_s']:.2f}", f"{r['p50']:.0f}", f"{r['p95']:.0f}",
                   f"{r['p99']:.0f}", f"{r['batch']:.2f}", f"{r['rss_first']:.0f}", f"{r['rss_end']:.0f}",
                   f"{100 * (r['rss_end'] / r['rss_first'] - 1):+.1f}%", r["exit"]] for r in rows]
        table.append([f"infer.py --batch_size 8{at}", len(paths), "", "", f"{infer_rate:.2f}", "", "", "", "8", "", "",
                      "", ""])
    print(format_table(header, table))
    for precision, ((batched, single), infer_rate) in results.items():
        print(f"[{precision}] serve --max_batch 8 / infer.py --batch_size 8: {batched['images_s'] / infer_rate:.2f}x  "
              f"(issue: >= 0.85)")
        print(f"[{precision}] serve --max_batch 8 / serve --max_batch 1:     "
              f"{batched['images_s'] / single['images_s']:.2f}x  (issue: >= 1.3)")
    for precision in precisions[1:]:  # the target on AMX-BF16: >= 2x the fp32 throughput
        print(f"serve --max_batch 8 at {precision} / at {precisions[0]}: "
              f"{results[precision][0][0]['images_s'] / results[precisions[0]][0][0]['images_s']:.2f}x")
    return 0


if __name__ == "__main__":
    main()
