"""Load test of serve.py: OrthoAD R18 (k=100) trained on bottle and exported into a temporary
folder, served on 127.0.0.1, the bottle test images posted by concurrent clients. Prints errors,
throughput, latency percentiles and the server's RSS after the first 50 requests and at the end,
for --max_batch 8 and --max_batch 1, beside `infer.py --batch_size 8` over the same images in the
same run (before and after the services, averaged). Prints figures; asserts nothing.

    python benchmarks/bench_serve.py [--requests 400] [--clients 8] [--max_seconds 300]
    python benchmarks/bench_serve.py --requests 40 --train_images 12 --resize 64 --crop_size 64 --k 8  # quick
"""
import argparse
import contextlib
import io
import json
import os
import tempfile
import threading
import time

import numpy as np
import requests

from common import DATA, WEIGHTS, require_shared

import export_model  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from datasets import test_samples  # noqa: E402
from service.launch import ServiceProcess  # noqa: E402
from utils import format_table  # noqa: E402

RSS_AFTER = 50


def training_data(tmp, n_images):
    """DATA, or a copy of bottle (symlinks) with only its first `n_images` train images."""
    if not n_images:
        return DATA
    src, root = os.path.join(DATA, "bottle"), os.path.join(tmp, "data")
    dst = os.path.join(root, "bottle")
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        keep = sorted(files)[:n_images] if rel == os.path.join("train", "good") else files
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in keep:
            os.symlink(os.path.join(dirpath, f), os.path.join(dst, rel, f))
    return root


def train_and_export(tmp, flags, train_images, threads):
    """A bottle model (`flags`) trained on training_data(tmp, train_images) and exported under
    `tmp`: -> (data root, export folder)."""
    data = training_data(tmp, train_images)
    run = os.path.join(tmp, "run")
    train.main(["--data_path", data, "--category", "bottle", *flags, "--backbone_weights", WEIGHTS,
                "--save_path", run, "--no_progress", "--cpu_threads", str(threads)])
    model_dir = os.path.join(tmp, "inference", "bottle")
    export_model.main([*flags, "--model_path", os.path.join(run, "bottle.pdparams"), "--save_dir", model_dir])
    return data, model_dir


def load_test(url, bodies, n_requests, clients, max_seconds, on_count):
    """`clients` threads post bodies in turn until `n_requests` are answered or time runs out;
    -> (latencies in s of the 200s, error count, wall seconds, timed out)."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": 0}
    latencies = []
    stop_at = time.perf_counter() + max_seconds

    def client():
        session = requests.Session()
        while time.perf_counter() < stop_at:
            with lock:
                i = state["next"]
                if i >= n_requests:
                    return
                state["next"] += 1
            t0 = time.perf_counter()
            try:
                ok = session.post(url, data=bodies[i % len(bodies)], timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            seconds = time.perf_counter() - t0
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
    return latencies, state["errors"], wall, state["next"] < n_requests


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
    args = p.parse_args()
    require_shared()
    flags = ["--method", "ortho", "--arch", "resnet18", "--k", str(args.k), "--resize", str(args.resize),
             "--crop_size", str(args.crop_size)]
    with tempfile.TemporaryDirectory() as tmp:
        data, model_dir = train_and_export(tmp, flags, args.train_images, args.threads)
        paths = [s.image_path for s in test_samples(data, "bottle")]
        bodies = []
        for path in paths:
            with open(path, "rb") as f:
                bodies.append(f.read())
        # infer.py before and after the services: a drift of the machine's speed lands on both sides.
        infer_before = run_infer(model_dir, paths, tmp, args, "before")
        rows = [run_service(model_dir, os.path.join(tmp, f"serve{b}.log"), bodies, args, b) for b in (8, 1)]
        infer_rate = (infer_before + run_infer(model_dir, paths, tmp, args, "after")) / 2
    print(f"\nOrthoAD R18 k={args.k} bottle, {args.resize}->{args.crop_size} px, {len(paths)} test images, "
          f"{args.requests} requests from {args.clients} clients, --cpu_threads {args.threads}, "
          f"--max_wait_ms {args.max_wait_ms}, {os.cpu_count()} CPUs")
    header = ["config", "answered", "errors", "s", "img/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
              f"RSS@{RSS_AFTER} MB", "RSS end MB", "RSS growth", "exit"]
    table = [[r["config"] + (" (TIMED OUT)" if r["timed_out"] else ""), r["answered"], r["errors"],
              f"{r['seconds']:.1f}", f"{r['images_s']:.2f}", f"{r['p50']:.0f}", f"{r['p95']:.0f}", f"{r['p99']:.0f}",
              f"{r['batch']:.2f}", f"{r['rss_first']:.0f}", f"{r['rss_end']:.0f}",
              f"{100 * (r['rss_end'] / r['rss_first'] - 1):+.1f}%", r["exit"]] for r in rows]
    table.append(["infer.py --batch_size 8", len(paths), "", "", f"{infer_rate:.2f}", "", "", "", "8", "", "", "", ""])
    print(format_table(header, table))
    batched, single = rows
    print(f"serve --max_batch 8 / infer.py --batch_size 8: {batched['images_s'] / infer_rate:.2f}x  "
          f"(issue: >= 0.85)")
    print(f"serve --max_batch 8 / serve --max_batch 1:     {batched['images_s'] / single['images_s']:.2f}x  "
          f"(issue: >= 1.3)")
    return 0


if __name__ == "__main__":
    main()
