"""TIPC: prepare.sh + test_train_inference_python.sh in lite_train_lite_infer for every model config,
and a deliberately broken config that must be reported as `Run failed` with a non-zero exit.

The chain runs the real scripts in subprocesses (train -> eval -> export -> 8 infer combinations per
model), a few minutes for all models on 2 CPU cores.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "test_tipc", "configs", "*", "train_infer_python.txt")))
MODE = "lite_train_lite_infer"
# Per model on a CPU-only build: train, eval, export, then infer.py for enable_mkldnn True|False x
# cpu_threads 1|2 x batch_size 1|2 at fp32 (the GPU lines are skipped, not run).
CPU_COMMANDS = 3 + 2 * 2 * 2
BENCHMARK_KEYS = {"runtime_device", "enable_mkldnn", "cpu_math_library_num_threads", "batch_size", "precision",
                  "preprocess_time_ms", "inference_time_ms", "postprocess_time_ms"}


def cuda_build():
    import paddle
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def run_bash(script, config, env=None):
    # The configs call `python`: make it this interpreter.
    env = dict(os.environ, **(env or {}))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", os.path.join("test_tipc", script), config, MODE], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)


def config_value(config, key):
    with open(config) as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.rstrip("\n").split(":", 1)[1]
    raise KeyError(key)


def log_dir(model_name):
    return os.path.join(ROOT, "test_tipc", "output", model_name, MODE)


def read_results(model_name):
    with open(os.path.join(log_dir(model_name), "results_python.log")) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def test_every_model_has_a_config():
    assert {os.path.basename(os.path.dirname(c)) for c in CONFIGS} >= {"OrthoAD", "PaDiM", "PatchCore"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(os.path.dirname(c)))
def test_lite_chain_runs_successfully(config, mvtec_lite, r18_weights):
    prep = run_bash("prepare.sh", config)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    chain = run_bash("test_train_inference_python.sh", config)
    model_name = config_value(config, "model_name")
    lines = read_results(model_name)
    failed = [line for line in lines if not line.startswith("Run successfully with command - ")]
    assert chain.returncode == 0 and not failed, "\n".join(failed) + chain.stdout[-3000:] + chain.stderr[-3000:]
    assert all(line.endswith("!") for line in lines)
    if cuda_build():
        assert len(lines) > CPU_COMMANDS
        return
    assert len(lines) == CPU_COMMANDS, "\n".join(lines)
    steps = [line.split(" - ", 1)[1].split()[1] for line in lines]
    assert steps[:3] == ["train.py", "eval.py", "export_model.py"] and set(steps[3:]) == {"infer.py"}
    # One benchmark report (a JSON line) per inference command, with the settings it ran with.
    reports = sorted(glob.glob(os.path.join(log_dir(model_name), "python_infer_cpu_*_benchmark.log")))
    assert len(reports) == CPU_COMMANDS - 3
    for path in reports:
        with open(path) as f:
            records = [json.loads(line) for line in f]
        assert len(records) == 1 and BENCHMARK_KEYS <= set(records[0])
        assert f"threads_{records[0]['cpu_math_library_num_threads']}_" in os.path.basename(path)
        assert f"batchsize_{records[0]['batch_size']}_" in os.path.basename(path)
    # The GPU lines of the config are skipped with a note on this CPU-only build, not failed.
    with open(os.path.join(log_dir(model_name), "skipped_python.log")) as f:
        assert "Skipped on GPU" in f.read()


def test_broken_config_is_reported_as_failed(tmp_path, mvtec_lite, r18_weights):
    """A train command with an unknown flag: train fails, and so does everything that needs its model."""
    source = os.path.join(ROOT, "test_tipc", "configs", "OrthoAD", "train_infer_python.txt")
    with open(source) as f:
        text = f.read()
    broken = (text.replace("model_name:OrthoAD", "model_name:OrthoAD_broken")
              .replace("norm_train:train.py", "norm_train:train.py --no_such_flag")
              # one inference combination keeps the failing chain short
              .replace("--enable_mkldnn:True|False", "--enable_mkldnn:True")
              .replace("--cpu_threads:1|2", "--cpu_threads:1")
              .replace("--batch_size:1|2", "--batch_size:1"))
    assert broken.count("--no_such_flag") == 1
    config = tmp_path / "train_infer_python.txt"
    config.write_text(broken)
    try:
        prep = run_bash("prepare.sh", str(config))
        assert prep.returncode == 0, prep.stdout + prep.stderr
        chain = run_bash("test_train_inference_python.sh", str(config))
        assert chain.returncode != 0
        lines = read_results("OrthoAD_broken")
        assert len(lines) == 4, "\n".join(lines)  # train, eval, export, one infer
        assert all(line.startswith("Run failed with command - ") for line in lines), "\n".join(lines)
        assert "--no_such_flag" in lines[0]
        with open(os.path.join(log_dir("OrthoAD_broken"), "norm_train_gpus_-1_autocast_null_train.log")) as f:
            assert "unrecognized arguments: --no_such_flag" in f.read()
    finally:
        shutil.rmtree(os.path.join(ROOT, "test_tipc", "output", "OrthoAD_broken"), ignore_errors=True)


def test_bad_arguments_exit_2():
    config = CONFIGS[0]
    for script in ("prepare.sh", "test_train_inference_python.sh"):
        out = subprocess.run(["bash", os.path.join("test_tipc", script), config, "no_such_mode"], cwd=ROOT,
                             capture_output=True, text=True, check=False)
        assert out.returncode == 2 and "usage:" in out.stderr


def test_synthetic_set_has_the_mvtec_layout(tmp_path):
    """The offline fallback of prepare.sh: what make_synthetic_mvtec.py writes reads as a category."""
    out = tmp_path / "mvtec"
    subprocess.run([sys.executable, os.path.join(ROOT, "test_tipc", "make_synthetic_mvtec.py"), "--out", str(out),
                    "--n_train", "5", "--n_test", "2", "--size", "64"], check=True, capture_output=True)
    from datasets import test_samples, train_samples
    from datasets.mvtec import load_sample
    from datasets.transforms import Preprocess
    assert len(train_samples(str(out), "bottle")) == 5
    samples = test_samples(str(out), "bottle")
    assert sorted({s.defect_type for s in samples}) == ["broken_large", "contamination", "good"]
    assert len(samples) == 6
    for s in samples:
        _, _, mask = load_sample(s, Preprocess(64, 64), with_mask=True)
        assert (mask.max() > 0) == bool(s.label)
