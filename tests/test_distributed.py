"""Scale-out on paddle.distributed.launch (CPU, gloo, 2 processes) against one process, on a few
bottle images at 64 px: split categories give the same models, categories spread over workers
are each written once, a killed worker stops the launch cleanly, and --update equals a fit on
the union of the images."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

import eval as eval_script
import models.gaussian as gaussian_module
import train as train_script
from models.gaussian import EPSILON, ExactSums, unpack_precision
from models.parallel import set_cpu_threads
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--resize", "64", "--crop_size", "64", "--no_progress", "--cpu_threads", "1", "--num_workers", "1"]
ORTHO = ["--method", "ortho", "--k", "20"]
LAUNCH_TIMEOUT = 240


def link_category(src, dst, train, tests=("good", "broken_large")):
    """An MVTec-layout category of symlinks: train/good images `train`, 3 test images per type."""
    os.makedirs(os.path.join(dst, "train", "good"))
    for i in train:
        os.symlink(os.path.join(src, "train", "good", f"{i:03d}.png"), os.path.join(dst, "train", "good", f"{i:03d}.png"))
    for kind in tests:
        os.makedirs(os.path.join(dst, "test", kind))
        if kind != "good":
            os.makedirs(os.path.join(dst, "ground_truth", kind))
        for i in range(3):
            os.symlink(os.path.join(src, "test", kind, f"{i:03d}.png"), os.path.join(dst, "test", kind, f"{i:03d}.png"))
            if kind != "good":
                os.symlink(os.path.join(src, "ground_truth", kind, f"{i:03d}_mask.png"),
                           os.path.join(dst, "ground_truth", kind, f"{i:03d}_mask.png"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, mvtec_lite):
    root = tmp_path_factory.mktemp("dist_data")
    src = os.path.join(mvtec_lite, "bottle")
    link_category(src, str(root / "two" / "bottle"), range(8))
    link_category(src, str(root / "two" / "bottle2"), range(8, 14))
    link_category(src, str(root / "a" / "bottle"), range(4))
    link_category(src, str(root / "b" / "bottle"), range(4, 8))
    return root


def clean_env():
    """No launch variables inherited: a one-process run must stay one."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}


def train(args, workers=1, log_dir=None, timeout=LAUNCH_TIMEOUT, script="train.py"):
    cmd = [sys.executable]
    if workers > 1:
        cmd += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(workers), "--log_dir", str(log_dir)]
    return subprocess.run(cmd + [script] + [str(a) for a in args] + SMALL, cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def fit_here(args):
    """A one-process train.py run in this process (no interpreter start-up): a reference the
    launches are compared with, or a model they start from."""
    assert train_script.main([str(a) for a in args] + SMALL) == 0


@pytest.fixture(autouse=True)
def every_core_afterwards():
    """SMALL's --cpu_threads 1, given to an entry point in this process, stays in force: every
    core again for the tests after."""
    yield
    set_cpu_threads(None)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load(path):
    return paddle.load(str(path), return_numpy=True)


def gaussian(sums_file):
    """float64 mean and precision from saved sums."""
    with np.load(sums_file) as f:
        n, total, tri = int(f["count"]), f["sum"], f["outer"]
    k = total.shape[1]
    rows, cols = np.triu_indices(k)
    outer = np.zeros((len(tri), k, k))
    outer[:, rows, cols] = tri
    outer[:, cols, rows] = tri
    mean = total / n
    cov = (outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1) + np.eye(k) * 0.01
    return mean, np.linalg.inv(cov)


def assert_rel(a, b, tol=1e-6):
    assert np.abs(a - b).max() <= tol * np.abs(b).max()


def test_exact_sums_of_parts_add_up_to_the_sums_of_all(monkeypatch, tmp_path):
    """What workers and --update rely on: float64 sums of parts, added, equal those of the
    whole, and give numpy's mean and precision within 1e-6 (a large mean: the sums re-centre)."""
    monkeypatch.setattr(gaussian_module, "POSITION_CHUNK", 16)  # updates in steps of 16 positions
    feats = (np.random.RandomState(0).randn(23, 5, 6, 8) * 0.1 + 50.0).astype(np.float32)
    whole, merged = ExactSums(), ExactSums()
    whole.update(feats)
    for lo, hi in ((0, 9), (9, 10), (10, 23)):
        part = ExactSums()
        part.update(feats[lo:hi])
        merged.add_sums(part.sums())
    a, b = merged.sums(), whole.sums()
    assert a["count"] == b["count"] == 23
    assert_rel(a["sum"], b["sum"], 1e-14)
    assert_rel(a["outer"], b["outer"], 1e-14)
    np.savez(tmp_path / "s.npz", **a)
    mean, precision = gaussian(tmp_path / "s.npz")
    x = feats.reshape(23, 5, 48).astype(np.float64)
    for p in (0, 17, 47):
        assert_rel(mean[p], x[:, :, p].mean(0))
        assert_rel(precision[p], np.linalg.inv(np.cov(x[:, :, p], rowvar=False) + EPSILON * np.eye(5)))
    np.testing.assert_allclose(merged.finalize()[0], x.mean(0).T, rtol=1e-6)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    fit_here(["--data_path", data / "two", "--category", "bottle", *ORTHO, "--eval", "--keep_sums", "--save_path", out])
    return out


def test_padim_split_over_two_workers_equals_one_process(data, one_process, tmp_path):
    out = tmp_path / "two"
    proc = ok(train(["--data_path", data / "two", "--category", "bottle", *ORTHO, "--eval", "--keep_sums",
                     "--save_path", out], workers=2, log_dir=tmp_path / "log"))
    assert "error" not in proc.stderr.lower().replace("error log", "")
    for got, want in zip(gaussian(out / "bottle.sums.npz"), gaussian(one_process / "bottle.sums.npz")):
        assert_rel(got, want)
    a, b = load(out / "bottle.pdparams"), load(one_process / "bottle.pdparams")
    assert a["train_images"] == b["train_images"] == 8
    assert_rel(a["stats"]["mean"], b["stats"]["mean"])
    assert_rel(unpack_precision(a["stats"]["precision_packed"], a["stats"]["precision_scale"]),
               unpack_precision(b["stats"]["precision_packed"], b["stats"]["precision_scale"]), 1e-4)
    assert (out / "results.csv").read_text() == (one_process / "results.csv").read_text()
    assert "results:" not in (tmp_path / "log" / "workerlog.1").read_text()  # one writer


def test_patchcore_split_over_two_workers_chooses_the_same_coreset(data, tmp_path):
    flags = ["--data_path", data / "two", "--category", "bottle", "--method", "coreset", "--coreset_ratio", "0.1",
             "--eval"]
    fit_here(flags + ["--save_path", tmp_path / "one"])
    ok(train(flags + ["--save_path", tmp_path / "two"], workers=2, log_dir=tmp_path / "log"))
    a, b = load(tmp_path / "two" / "bottle.pdparams"), load(tmp_path / "one" / "bottle.pdparams")
    np.testing.assert_array_equal(a["stats"]["memory_bank"], b["stats"]["memory_bank"])
    assert (tmp_path / "two" / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()


def test_evaluation_split_over_two_workers_equals_one_process(data, one_process, tmp_path):
    """eval.py on one category with two workers: each scores half of the test images, worker 0
    computes the metrics and stores the thresholds: the same as one process."""
    records = []
    for name, workers in (("one", 1), ("two", 2)):
        out = tmp_path / name
        os.makedirs(out)
        shutil.copy(one_process / "bottle.pdparams", out / "bottle.pdparams")
        args = ["--data_path", data / "two", "--category", "bottle", *ORTHO, "--eval_PRO", "--save_path", out]
        if workers == 1:
            assert eval_script.main([str(a) for a in args] + SMALL) == 0
        else:
            ok(train(args, workers=workers, log_dir=tmp_path / "log", script="eval.py"))
        record = json.loads((out / "metrics" / "bottle.json").read_text())
        for volatile in ("ms_per_image", "pro_s", "timing"):
            record.pop(volatile, None)
        records.append((record, (out / "results.csv").read_text(), load(out / "bottle.pdparams")["calibration"]))
    assert records[0][0] == records[1][0] and records[0][1] == records[1][1]
    assert records[0][2] == records[1][2]


def test_greedy_k_center_over_two_workers_equals_one_process(tmp_path):
    """Small pools, rounds and blocks, so that the early updates and the pruned phase run."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scaleout_greedy_worker import SETTINGS, points
    from models.patchcore import greedy_k_center
    out = tmp_path / "chosen.npy"
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                           "--log_dir", str(tmp_path / "log"), "tests/scaleout_greedy_worker.py", str(out)],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    ok(proc)
    np.testing.assert_array_equal(np.load(out), greedy_k_center(points(), 700, seed=3, **SETTINGS)[0])


def test_categories_spread_over_workers_each_written_once(data, one_process, tmp_path):
    out = tmp_path / "out"
    ok(train(["--data_path", data / "two", "--category", "all", *ORTHO, "--eval", "--save_path", out],
             workers=2, log_dir=tmp_path / "log"))
    logs = [(tmp_path / "log" / f"workerlog.{r}").read_text() for r in (0, 1)]
    # balanced by image count: bottle (8) to worker 0, bottle2 (6) to worker 1
    assert "worker 0 of 2: bottle\n" in logs[0] and "worker 1 of 2: bottle2\n" in logs[1]
    assert sorted(os.listdir(out)) == ["bottle.pdparams", "bottle2.pdparams", "metrics", "results.csv"]
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["category", "bottle", "bottle2", "mean"]
    assert rows[1] == (one_process / "results.csv").read_text().splitlines()[1]
    assert "results:" not in logs[1]


def worker_pid(log_dir, rank):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"PADDLE_LOG_DIR") == str(log_dir).encode() and env.get(b"PADDLE_TRAINER_ID") == str(rank).encode():
            return int(pid)
    return None


def test_a_killed_worker_stops_the_launch_cleanly(data, tmp_path):
    """Worker 1 is killed during its fit: the launch ends non-zero in bounded time, the survivor
    says why in one line, and no half-written model or temporary file is left."""
    out, log_dir = tmp_path / "out", tmp_path / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           "train.py", "--data_path", str(data / "two"), "--category", "all", *ORTHO, "--save_path", str(out)] + SMALL
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        log1 = log_dir / "workerlog.1"
        while not (log1.exists() and "[train] bottle2" in log1.read_text()):
            assert proc.poll() is None and time.monotonic() - t0 < LAUNCH_TIMEOUT
            time.sleep(0.1)
        os.kill(worker_pid(log_dir, 1), signal.SIGKILL)
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 1" in output and "code -9" in output  # the launch names the killed worker
    log0 = (log_dir / "workerlog.0").read_text()
    if "[train] bottle\n" in log0 and not os.path.exists(out / "bottle.pdparams"):
        assert "error: worker 0 of 2, category bottle: stopped by the launch: another worker failed" in log0
    assert not os.path.exists(out / "bottle2.pdparams")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp.pdparams")] if out.exists() else True
    if os.path.exists(out / "bottle.pdparams"):  # worker 0 finished first: its model is whole
        assert load(out / "bottle.pdparams")["category"] == "bottle"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_update_equals_a_fit_on_the_union(data, tmp_path):
    model = tmp_path / "a" / "bottle.pdparams"
    flags = ["--category", "bottle", *ORTHO, "--calib_ratio", "0"]
    fit_here(["--data_path", data / "a", "--keep_sums", "--save_path", tmp_path / "a", *flags])
    fit_here(["--data_path", data / "two", "--keep_sums", "--save_path", tmp_path / "union", *flags])
    proc = ok(train(["--update", "--data_path", data / "b", "--model_path", model, *flags]))
    assert "4 images added, 8 in all" in proc.stdout
    for got, want in zip(gaussian(tmp_path / "a" / "bottle.sums.npz"), gaussian(tmp_path / "union" / "bottle.sums.npz")):
        assert_rel(got, want)
    a, b = load(model), load(tmp_path / "union" / "bottle.pdparams")
    assert a["train_images"] == 8
    assert_rel(a["stats"]["mean"], b["stats"]["mean"])
    assert_rel(unpack_precision(a["stats"]["precision_packed"], a["stats"]["precision_scale"]),
               unpack_precision(b["stats"]["precision_packed"], b["stats"]["precision_scale"]), 1e-4)

    # bad input: one line, exit != 0, the model untouched
    bare = tmp_path / "bare" / "bottle.pdparams"
    os.makedirs(bare.parent)
    bare.write_bytes(model.read_bytes())
    cases = [(["--model_path", bare, *flags], "has no saved sums"),
             (["--model_path", model, "--category", "bottle", "--method", "ortho", "--k", "30"], "trained with k=20"),
             (["--model_path", model, "--category", "bottle", "--method", "sample", "--k", "20"],
              "trained with method=ortho"),
             (["--model_path", model, "--category", "bottle", "--method", "coreset"], "are for the PaDiM/OrthoAD")]
    before = digest(model), digest(bare)
    # The first case as a user meets it (a process: one `error:` line, no traceback); the others
    # in this process, where train.py raises the UserError that becomes that line.
    (extra, message), *others = cases
    proc = train(["--update", "--data_path", data / "b", *extra])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    for extra, message in others:
        with pytest.raises(UserError) as err:
            train_script.main([str(a) for a in ["--update", "--data_path", data / "b", *extra]] + SMALL)
        assert message in str(err.value) and "\n" not in str(err.value)
    assert (digest(model), digest(bare)) == before


def test_efficientad_data_parallel_steps_checkpoint_and_resume(data, r18_weights, tmp_path):
    """A few data-parallel steps on two workers: finite losses, worker 0 alone writes the one
    checkpoint and the model, and --resume continues with the same number of workers."""
    teacher = tmp_path / "teacher.pdparams"
    flags = ["--method", "efficientad", "--backbone_weights", r18_weights, "--teacher_weights", teacher]
    fit_here(flags + ["--distill", "--distill_data", data / "a" / "bottle" / "train", "--train_steps", "2",
                      "--save_path", tmp_path])
    out = tmp_path / "run"
    run = flags + ["--data_path", data / "a", "--category", "bottle", "--train_crop", "64", "--split_category",
                   "--save_path", out]
    ok(train(run + ["--train_steps", "3"], workers=2, log_dir=tmp_path / "log"))
    ok(train(run + ["--train_steps", "5", "--resume"], workers=2, log_dir=tmp_path / "log2"))
    assert sorted(os.listdir(out / "checkpoints")) == ["bottle.ckpt"]
    checkpoint = load(out / "checkpoints" / "bottle.ckpt")
    assert checkpoint["identity"]["workers"] == 2 and checkpoint["step"] == 5
    assert len(checkpoint["losses"]) == 5 and np.isfinite(checkpoint["losses"]).all()
    assert load(out / "bottle.pdparams")["training"]["steps"] == 5
    assert "results:" not in (tmp_path / "log2" / "workerlog.1").read_text()
