"""Scale-out figures: 1 worker vs 2 workers under paddle.distributed.launch (each worker
--cpu_threads 1), measured in one run; prints figures, asserts nothing.

* bottle OrthoAD R18 k=100 fit, the category's images split over the workers;
* bottle PatchCore 10% fit (features + exact coreset), and each worker's peak RSS;
* two categories (bottle and a copy of it) with --category all, one per worker.

    python benchmarks/bench_distributed.py [--images N] [--keep DIR] [--only ortho|coreset|categories]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import DATA, ROOT, WEIGHTS, cpu_header, require_shared

POLL_S = 0.2


def make_data(root, images):
    """bottle (its first `images` training images, all test images) and bottle_copy, as links."""
    src = os.path.join(DATA, "bottle")
    for name in ("bottle", "bottle_copy"):
        good = os.path.join(root, name, "train", "good")
        os.makedirs(good)
        for f in sorted(os.listdir(os.path.join(src, "train", "good")))[:images]:
            os.symlink(os.path.join(src, "train", "good", f), os.path.join(good, f))
        for sub in ("test", "ground_truth"):
            os.symlink(os.path.join(src, sub), os.path.join(root, name, sub))


def worker_peaks(log_dir):
    """{rank: VmHWM MB} of the live workers of the launch writing to log_dir."""
    peaks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if env.get(b"PADDLE_LOG_DIR") != log_dir.encode() and env.get(b"BENCH_TAG") != log_dir.encode():
                continue
            with open(f"/proc/{pid}/status") as f:
                hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
            peaks[int(env.get(b"PADDLE_TRAINER_ID", b"0"))] = hwm
        except (OSError, StopIteration):
            continue
    return peaks


def run(flags, workers, out, log_dir):
    """-> (wall s, fit s of worker 0 per category, peak RSS MB per worker)."""
    cmd = [sys.executable]
    if workers > 1:
        cmd += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(workers), "--log_dir", log_dir]
    cmd += ["train.py", *flags, "--save_path", out, "--cpu_threads", "1", "--num_workers", "1", "--no_progress",
            "--backbone_weights", WEIGHTS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["BENCH_TAG"] = log_dir  # finds a one-process run's process too
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {}
    while proc.poll() is None:
        for rank, mb in worker_peaks(log_dir).items():
            peaks[rank] = max(mb, peaks.get(rank, 0))
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"benchmark run failed ({' '.join(cmd)}):\n{output[-3000:]}")
    fits = {}
    for name in sorted(os.listdir(os.path.join(out, "metrics"))):
        with open(os.path.join(out, "metrics", name)) as f:
            record = json.load(f)
        fits[record["category"]] = record["timing"]["fit_s"]
    return wall, fits, peaks


def compare(title, flags, tmp, note=""):
    results = {}
    for workers in (1, 2):
        tag = f"{title.split()[0]}_{workers}"
        results[workers] = run(flags, workers, os.path.join(tmp, tag), os.path.join(tmp, "log_" + tag))
    (w1, f1, p1), (w2, f2, p2) = results[1], results[2]
    print(f"\n{title}{note}")
    print(f"  wall (launch, model load, fit, write): 1 worker {w1:.1f} s, 2 workers {w2:.1f} s: x{w1 / w2:.2f}")
    if len(f1) == 1:
        (c, a), b = next(iter(f1.items())), f2[next(iter(f1))]
        print(f"  fit of {c}: 1 worker {a:.1f} s, 2 workers {b:.1f} s: x{a / b:.2f}")
    peak1 = max(p1.values()) if p1 else float("nan")
    per_worker = ", ".join(f"worker {r} {mb:.0f} MB" for r, mb in sorted(p2.items()))
    print(f"  peak RSS: 1 worker {peak1:.0f} MB; 2 workers: {per_worker} "
          f"(x{max(p2.values()) / peak1:.2f} of one)" if p2 else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=209, help="bottle training images (all: 209)")
    parser.add_argument("--keep", default=None, help="keep the runs' outputs in this folder")
    parser.add_argument("--only", choices=("ortho", "coreset", "categories"), default=None,
                        help="run only this case")
    args = parser.parse_args()
    require_shared()
    print(cpu_header())
    tmp = args.keep or tempfile.mkdtemp(prefix="bench_distributed_")
    data = os.path.join(tmp, "data")
    make_data(data, args.images)
    print(f"bottle, {args.images} training images, 224 px, each worker --cpu_threads 1, "
          f"{os.cpu_count()} cores")
    common = ["--data_path", data, "--calib_ratio", "0"]
    cases = {
        "ortho": ("OrthoAD R18 k=100 fit, one category split over the workers",
                  ["--category", "bottle", "--method", "ortho", "--k", "100", "--split_category"]),
        "coreset": ("PatchCore 10% fit (features + exact greedy coreset), one category split over the workers",
                    ["--category", "bottle", "--method", "coreset", "--coreset_ratio", "0.1", "--split_category"]),
        "categories": ("Two categories (bottle, bottle_copy) with --category all, OrthoAD R18 k=100: one per worker",
                       ["--category", "all", "--method", "ortho", "--k", "100"]),
    }
    for name, (title, flags) in cases.items():
        if args.only in (None, name):
            compare(title, common + flags, tmp)
    if not args.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
