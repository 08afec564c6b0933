"""serve.py against hostile and careless clients (issue 21): OrthoAD R18 trained on bottle and
exported into a temporary folder, served on 127.0.0.1 with --max_queue 8. Prints, asserting
nothing:
  - a normal client's latency (sequential requests, p50/p99) with no attack, with --max_queue
    slow uploads held open (headers, Content-Length 70000, the first 100 bytes, then nothing),
    and with 200 of them;
  - the server's peak RSS while 8 clients post at once the largest image --max_megapixels allows
    (RGB, RGBA and 16-bit PNG, JPEG), beside the stated bound;
  - the 12000x1 and 1x60000 PNGs: resize-then-crop as before (12000x1 in a child process; the
    1x60000 one is not run: its intermediate image alone needs 11.8 GB) against the one-step
    centre crop and the size floor now, in the service and in the scripts' reader.

    python benchmarks/bench_attack.py [--train_images 12] [--requests 60]
"""
import argparse
import concurrent.futures
import io
import os
import select
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import requests
from PIL import Image

from bench_serve import train_and_export
from common import ROOT, require_shared

from datasets import test_samples, transforms  # noqa: E402
from service.launch import ServiceProcess  # noqa: E402
from utils import UserError, format_table  # noqa: E402

MAX_QUEUE = 8
MAX_MEGAPIXELS = 40
# One decode's peak, per pixel: measured 12.1 B at worst (RGBA PNG, palette PNG with transparency,
# 16-bit gray PNG), 7 for 8-bit RGB PNG, 8 for JPEG and TIFF; the bound rounds the worst up.
DECODE_BYTES_PER_PIXEL = 14
OLD_12000x1 = """
import resource, sys, time
sys.path.insert(0, {root!r})
from PIL import Image
from datasets import transforms
img = Image.new("RGB", (12000, 1), (90, 90, 90))
t0 = time.perf_counter()
w, h = transforms._resized_size(12000, 1, 256)
img = img.resize((w, h), Image.LANCZOS)
left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
img.crop((left, top, left + 224, top + 224)).load()
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def slow_upload(port, first):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /predict/bottle HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 70000\r\n\r\n"
              + first)
    return s


def still_held(sockets):
    """How many slow uploads have had no answer (nothing to read, not closed)."""
    return sum(not select.select([s], [], [], 0)[0] for s in sockets)


def latency_under_attack(srv, bodies, n_slow, n_requests):
    slow = [slow_upload(srv.port, bodies[0][:100]) for _ in range(n_slow)]
    time.sleep(0.5)
    latencies, statuses = [], []
    with requests.Session() as session:
        for i in range(n_requests):
            t0 = time.perf_counter()
            res = session.post(srv.url + "/predict/bottle", data=bodies[i % len(bodies)], timeout=60)
            latencies.append(1000 * (time.perf_counter() - t0))
            statuses.append(res.status_code)
    held = still_held(slow)
    for s in slow:
        s.close()
    ms = np.asarray(latencies)
    return [f"{n_slow} slow uploads" if n_slow else "no attack", n_requests, statuses.count(200),
            f"{np.percentile(ms, 50):.0f}", f"{np.percentile(ms, 99):.0f}", f"{held}/{n_slow}"]


def largest_images(base):
    """{kind: encoded bytes} of a MAX_MEGAPIXELS image (8000x5000): the bottle scaled by pixel repetition."""
    w, h = 8000, MAX_MEGAPIXELS * 1_000_000 // 8000
    rgb = np.asarray(base.resize((w // 8, h // 8))).repeat(8, 0).repeat(8, 1)
    img, out = Image.fromarray(rgb), {}
    for kind, image, fmt, kw in (("RGB PNG", img, "PNG", {"compress_level": 1}),
                                 ("RGBA PNG", img.convert("RGBA"), "PNG", {"compress_level": 1}),
                                 ("16-bit gray PNG", Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257),
                                  "PNG", {"compress_level": 1}),
                                 ("JPEG", img, "JPEG", {"quality": 90})):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        out[kind] = buf.getvalue()
    return out


def peak_rss_with_8_clients(srv, images, decode_threads):
    model_mb = srv.rss_mb()
    rows = []
    for kind, body in images.items():
        srv.reset_peak_rss()
        before = srv.rss_mb()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            t0 = time.perf_counter()
            codes = list(pool.map(lambda _: requests.post(srv.url + "/predict/bottle", data=body,
                                                          timeout=300).status_code, range(8)))
            seconds = time.perf_counter() - t0
        peak = srv.rss_mb("VmHWM")
        bound = model_mb + decode_threads * DECODE_BYTES_PER_PIXEL * MAX_MEGAPIXELS + 8 * len(body) / 2**20
        rows.append([kind, f"{len(body) / 2**20:.1f}", f"{codes.count(200)}/8", f"{seconds:.1f}", f"{before:.0f}",
                     f"{peak:.0f}", f"{peak - before:+.0f}", f"{bound:.0f}"])
    return rows


def extreme_images(srv, tmp):
    rows = []
    proc = subprocess.run([sys.executable, "-c", OLD_12000x1.format(root=ROOT)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 0:
        seconds, peak = map(float, proc.stdout.split())
        rows.append(["12000x1", "before: resize 3,072,000x256 then crop", f"{1000 * seconds:.0f}",
                     f"{peak:.0f} (process peak)"])
    else:
        rows.append(["12000x1", "before: resize then crop", "failed", proc.stderr.strip().splitlines()[-1]])
    rows.append(["1x60000", "before: resize 256x15,360,000 then crop", "not run", "needs 11.8 GB for the resize"])
    for w, h in ((12000, 1), (1, 60000)):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 90, 90)).save(buf, format="PNG")
        path = os.path.join(tmp, f"{w}x{h}.png")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        srv.reset_peak_rss()
        before = srv.rss_mb()
        t0 = time.perf_counter()
        res = requests.post(srv.url + "/predict/bottle", data=buf.getvalue(), timeout=60)
        ms = 1000 * (time.perf_counter() - t0)
        rows.append([f"{w}x{h}", f"now, service: {res.status_code} {res.json().get('error', '')[:40]}...",
                     f"{ms:.1f}", f"{srv.rss_mb('VmHWM') - before:+.1f} (server peak)"])
        preprocess = transforms.Preprocess(256, 224)
        t0 = time.perf_counter()
        try:
            preprocess.load(path)
            outcome = "scored"
        except UserError:
            outcome = "one-line error"
        rows.append([f"{w}x{h}", f"now, infer.py/predict.py reader: {outcome}",
                     f"{1000 * (time.perf_counter() - t0):.1f}", ""])
        t0 = time.perf_counter()
        preprocess.image(Image.new("RGB", (w, h), (90, 90, 90)))
        rows.append([f"{w}x{h}", "now, one-step centre crop alone (no floor)",
                     f"{1000 * (time.perf_counter() - t0):.1f}", ""])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=60, help="normal requests per attack level")
    p.add_argument("--train_images", type=int, default=12, help="first N bottle train images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    require_shared()
    flags = ["--method", "ortho", "--arch", "resnet18", "--k", "100"]
    decode_threads = 2
    with tempfile.TemporaryDirectory() as tmp:
        data, model_dir = train_and_export(tmp, flags, args.train_images, args.threads)
        paths = [s.image_path for s in test_samples(data, "bottle")]
        bodies = [open(path, "rb").read() for path in paths[:20]]
        srv = ServiceProcess(model_dir, os.path.join(tmp, "serve.log"), "--cpu_threads", str(args.threads),
                             "--max_queue", str(MAX_QUEUE), "--max_megapixels", str(MAX_MEGAPIXELS),
                             "--decode_threads", str(decode_threads))
        try:
            srv.wait_ready()
            latency_under_attack(srv, bodies, 0, 10)  # warm-up
            latency = [latency_under_attack(srv, bodies, n, args.requests) for n in (0, MAX_QUEUE, 200)]
            rss = peak_rss_with_8_clients(srv, largest_images(Image.open(paths[0]).convert("RGB")), decode_threads)
            extreme = extreme_images(srv, tmp)
        finally:
            srv.stop()
    print(f"\nserve.py, OrthoAD R18 k=100 bottle 256->224, --max_queue {MAX_QUEUE}, --cpu_threads {args.threads}, "
          f"--decode_threads {decode_threads}, --body_timeout_s 10, {os.cpu_count()} CPUs")
    print(format_table(["normal client", "requests", "200", "p50 ms", "p99 ms", "slow still held"], latency))
    print(f"\n8 clients at once, each the largest image --max_megapixels {MAX_MEGAPIXELS} allows (8000x5000); "
          f"bound = model RSS + {decode_threads} decode threads x {DECODE_BYTES_PER_PIXEL} B/px x {MAX_MEGAPIXELS} MP "
          f"+ the bodies")
    print(format_table(["image", "body MB", "200", "s", "RSS before MB", "peak MB", "growth MB", "bound MB"], rss))
    print("\nextreme aspect ratios")
    print(format_table(["image", "path", "ms", "RSS MB"], extreme))
    return 0


if __name__ == "__main__":
    main()
