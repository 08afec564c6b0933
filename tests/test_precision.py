"""--precision (models/precision.py): CPU detection, refusals, the bf16 engine setting, the model's
recorded precision through eval / predict / export / infer, accuracy at bf16; and an ONNX export
that installs nothing.

The detection reads AD_CPU_FLAGS instead of /proc/cpuinfo when it is set: these tests use it to
walk the bf16 code paths on any CPU. It changes only the project's decision, not Paddle: on a CPU
without AVX-512 (this project's test machine) Paddle's oneDNN runs fp32 kernels even when bf16 is
configured, so there the bf16 features equal the fp32 ones, which the tests check as such.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import eval as eval_script
import export_model
import infer
import predict
import train
from conftest import ROOT, assert_deployed_matches_predict
from models import load_model, precision
from utils import UserError, run_cli

BF16_CPU = "avx2 fma avx512f avx512_bf16 amx_tile amx_bf16"  # what a Sapphire Rapids lists (in part)
AVX2_CPU = "avx2 fma"
TINY = ["--method", "ortho", "--arch", "resnet18", "--k", "8", "--resize", "64", "--crop_size", "64"]
PADDLE_BF16 = precision.paddle_support()["bf16"]


@pytest.fixture
def bf16_calls(monkeypatch):
    """Counts config.enable_mkldnn_bfloat16() calls (Paddle has no getter for it)."""
    from paddle import inference
    calls = []
    original = inference.Config.enable_mkldnn_bfloat16
    monkeypatch.setattr(inference.Config, "enable_mkldnn_bfloat16", lambda self: (calls.append(1), original(self))[1])
    return calls


def fit_tiny(root, save, weights, *extra):
    assert train.main(["--data_path", root, "--category", "widget", *TINY, "--backbone_weights", weights,
                       "--save_path", save, "--no_progress", "--cpu_threads", "2", *extra]) == 0
    return load_model(os.path.join(save, "widget.pdparams"))


def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- detection
def test_flags_override_decides_what_is_native(monkeypatch):
    monkeypatch.setenv("AD_CPU_FLAGS", BF16_CPU)
    flags, source = precision.cpu_flags()
    assert source == "AD_CPU_FLAGS" and "amx_bf16" in flags
    assert precision.native("bf16") and precision.native("int8")  # AVX2 runs oneDNN's u8s8 int8 kernels
    assert precision.resolve("auto") == "bf16"
    header = precision.header_line()
    assert "amx_bf16" in header and "-amx_int8" in header and "native bf16: yes" in header
    monkeypatch.setenv("AD_CPU_FLAGS", "avx2,fma,avx512_vnni")  # commas work too
    assert not precision.native("bf16") and precision.native("int8")
    assert precision.resolve("auto") == "fp32" and precision.resolve(None) == "fp32"
    assert "avx512_bf16" in precision.missing("bf16") and "AD_CPU_FLAGS" in precision.missing("bf16")


def test_real_cpu_flags_match_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv("AD_CPU_FLAGS", raising=False)
    flags, source = precision.cpu_flags()
    with open("/proc/cpuinfo") as f:
        line = next(line for line in f if line.startswith("flags"))
    assert source == "/proc/cpuinfo" and flags == set(line.split(":", 1)[1].split())
    assert precision.native("bf16") == (bool(flags & {"amx_bf16", "avx512_bf16"}) and PADDLE_BF16 is not False)


@pytest.mark.parametrize("value,message", [
    ("bf16", "--precision bf16 needs native bf16 and this CPU lacks amx_bf16 and avx512_bf16 (AD_CPU_FLAGS)"),
    ("fp16", "--precision fp16 is a GPU precision (TensorRT)"),
])
def test_refusals_are_one_line(value, message, monkeypatch, synthetic_root, r18_weights, tmp_path, capsys):
    monkeypatch.setenv("AD_CPU_FLAGS", AVX2_CPU)
    save = tmp_path / "run"
    err = one_line_error(train.main, ["--data_path", synthetic_root, "--category", "widget", *TINY, "--backbone_weights",
                                      r18_weights, "--save_path", str(save), "--no_progress", "--precision", value],
                         capsys)
    assert message in err
    assert not save.exists()


def test_which_precision_a_fitted_model_runs_at(monkeypatch, capsys):
    monkeypatch.setenv("AD_CPU_FLAGS", AVX2_CPU)
    assert precision.for_model(None, {}) == "fp32"  # models from before precisions existed
    # export (and the ONNX runtimes, which check their own) records a choice: this CPU's flags are not consulted
    assert precision.for_model(None, {"precision": "bf16"}, runs_here=False) == "bf16"
    assert capsys.readouterr().err == ""
    assert precision.for_model("bf16", {"precision": "fp32"}, runs_here=False) == "bf16"
    assert "note: running at bf16 a model fitted at fp32" in capsys.readouterr().err
    with pytest.raises(UserError, match="this export runs at bf16, and this CPU lacks"):
        precision.for_model(None, {"precision": "fp32"}, default="bf16")
    # a GPU runs fp32 (or TensorRT's fp16/int8), never oneDNN's bf16
    assert precision.for_model(None, {"precision": "bf16"}, use_gpu=True) == "fp32"
    assert "note: running at fp32 a model fitted at bf16" in capsys.readouterr().err
    assert precision.for_model("fp16", {"precision": "fp32"}, use_gpu=True) == "fp16"
    with pytest.raises(UserError, match="--precision bf16 is a CPU precision here"):
        precision.check("bf16", use_gpu=True)
    with pytest.raises(UserError, match="fit it with train.py --precision int8"):
        precision.for_model("int8", {"precision": "fp32"})


def test_eager_engine_refuses_bf16(monkeypatch):
    from models.backbone import make_engine
    monkeypatch.setenv("AD_CPU_FLAGS", BF16_CPU)
    with pytest.raises(UserError, match="--engine eager runs fp32"):
        make_engine(None, (3, 64, 64), engine="eager", precision="bf16")


# ---------------------------------------------------------------- the bf16 engine
def test_bf16_engine_configures_onednn_bf16(monkeypatch, bf16_calls, r18_weights):
    """bf16 sets oneDNN's bf16 mode and nothing else: fp32 does not. Where Paddle runs bf16 kernels
    the features move by at most a few percent; where it cannot (supports_bfloat16() False) they
    equal fp32's, bit for bit."""
    import paddle

    from models.padim import PaDiMFeatureNet, make_projection
    from models.backbone import make_engine
    monkeypatch.setenv("AD_CPU_FLAGS", BF16_CPU)
    net = PaDiMFeatureNet("resnet18")
    net.backbone.load_pretrained(r18_weights)
    net.set_projection(*make_projection("ortho", net.backbone.channels(), 16, 0))
    x = np.random.RandomState(0).rand(2, 3, 64, 64).astype(np.float32) * 2 - 1
    fp32 = make_engine(net, (3, 64, 64), cpu_threads=2)(x)[0]
    assert not bf16_calls
    bf16 = make_engine(net, (3, 64, 64), cpu_threads=2, precision="bf16")(x)[0]
    assert len(bf16_calls) == 1
    rel = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
    if PADDLE_BF16:
        assert 0 < rel < 0.03, rel
    else:
        assert rel == 0, rel
    with pytest.raises(UserError, match="keep --enable_mkldnn True"):
        make_engine(net, (3, 64, 64), cpu_threads=2, precision="bf16", enable_mkldnn=False)
    paddle.disable_static()


# ---------------------------------------------------------------- the model's precision
def test_model_records_precision_from_fit_to_deployment(monkeypatch, bf16_calls, synthetic_root, r18_weights,
                                                        tmp_path, capsys):
    monkeypatch.setenv("AD_CPU_FLAGS", BF16_CPU)
    fp32_state = fit_tiny(synthetic_root, str(tmp_path / "fp32"), r18_weights)
    assert fp32_state["config"]["precision"] == "fp32" and not bf16_calls
    save = str(tmp_path / "bf16")
    state = fit_tiny(synthetic_root, save, r18_weights, "--precision", "auto")  # bf16: the flags say native
    assert state["config"]["precision"] == "bf16" and bf16_calls
    assert state["version"]["id"] != fp32_state["version"]["id"]  # the precision is part of the version
    capsys.readouterr()

    # eval.py: the model's precision, no note; another one: a note, and its thresholds are not stored
    base = ["--data_path", synthetic_root, "--category", "widget", *TINY, "--save_path", save, "--no_progress"]
    calls = len(bf16_calls)
    assert eval_script.main(base) == 0
    out = capsys.readouterr()
    assert len(bf16_calls) > calls and "note: running at" not in out.err and "stored F1-optimal thresholds" in out.out
    stored = load_model(os.path.join(save, "widget.pdparams"))
    calls = len(bf16_calls)
    assert eval_script.main([*base, "--precision", "fp32"]) == 0
    out = capsys.readouterr()
    assert len(bf16_calls) == calls
    assert [line for line in out.err.splitlines() if line.startswith("note: running at")] == [
        "note: running at fp32 a model fitted at bf16: its statistics and thresholds were calibrated at bf16, "
        "so scores move slightly"]
    assert "thresholds not stored" in out.out
    assert load_model(os.path.join(save, "widget.pdparams"))["version"] == stored["version"]

    # export records it; infer.py runs at it, and agrees with predict.py at it (same engine, same graph)
    images = sorted(os.path.join(synthetic_root, "widget", "test", "scratch", f) for f in
                    os.listdir(os.path.join(synthetic_root, "widget", "test", "scratch")))
    assert_deployed_matches_predict(save, TINY, "widget", images, tmp_path, capsys, engine="inference")
    from deploy.predictor import load_stats
    meta, _ = load_stats(str(tmp_path / "deployed" / "stats.npz"))
    assert meta["precision"] == "bf16" and meta["config"]["precision"] == "bf16"
    calls = len(bf16_calls)
    assert infer.main(["--model_dir", str(tmp_path / "deployed"), "--input_file", images[0], "--save_path",
                       str(tmp_path / "infer_bf16"), "--enable_benchmark", "True"]) == 0
    out = capsys.readouterr()
    assert len(bf16_calls) > calls and "precision: bf16" in out.out and "note: running at" not in out.err

    # a CPU without bf16: the model's precision is refused in one line, fp32 is said in one line
    monkeypatch.setenv("AD_CPU_FLAGS", AVX2_CPU)
    err = one_line_error(infer.main, ["--model_dir", str(tmp_path / "deployed"), "--input_file", images[0],
                                      "--save_path", str(tmp_path / "refused")], capsys)
    assert "this model was fitted at bf16, and this CPU lacks amx_bf16 and avx512_bf16" in err
    assert "--precision fp32" in err
    assert predict.main([images[0], "--category", "widget", *TINY, "--model_path", save, "--precision", "fp32",
                         "--output_dir", str(tmp_path / "pred_fp32"), "--no_progress"]) == 0
    assert "note: running at fp32 a model fitted at bf16" in capsys.readouterr().err


def test_update_keeps_the_models_precision(monkeypatch, synthetic_root, r18_weights, tmp_path, capsys):
    monkeypatch.setenv("AD_CPU_FLAGS", BF16_CPU)
    save = str(tmp_path / "run")
    fit_tiny(synthetic_root, save, r18_weights, "--precision", "bf16", "--keep_sums")
    err = one_line_error(train.main, ["--data_path", synthetic_root, "--category", "widget", *TINY, "--save_path", save,
                                      "--no_progress", "--update", "--precision", "fp32"], capsys)
    assert "was fitted at bf16: an update adds features at that precision" in err


# ---------------------------------------------------------------- accuracy held at bf16
def test_bf16_accuracy_within_bounds_on_bottle(monkeypatch, bottle_run, mvtec_lite, r18_weights, tmp_path):
    """OrthoAD R18 k=100 on bottle at bf16 (forced through AD_CPU_FLAGS) against the fp32 run:
    image AUROC, pixel AUROC and PRO within 0.003 / 0.003 / 0.005 (the issue's bounds). On a CPU
    where Paddle has no bf16 kernels this compares fp32 with fp32 (the metrics are then equal,
    which is asserted: a silent change of the fallback would show here)."""
    monkeypatch.setenv("AD_CPU_FLAGS", BF16_CPU)
    save = str(tmp_path / "bf16")
    assert train.main(["--data_path", mvtec_lite, "--category", "bottle", "--arch", "resnet18", "--method", "ortho",
                       "--k", "100", "--backbone_weights", r18_weights, "--eval_PRO", "--save_path", save,
                       "--no_progress", "--precision", "bf16"]) == 0
    results = []
    for run in (bottle_run, save):
        with open(os.path.join(run, "metrics", "bottle.json")) as f:
            results.append(json.load(f))
    fp32, bf16 = results
    for key, bound in (("image_AUROC", 0.003), ("pixel_AUROC", 0.003), ("PRO", 0.005)):
        assert abs(bf16[key] - fp32[key]) <= (bound if PADDLE_BF16 else 0), (key, fp32[key], bf16[key])


# ---------------------------------------------------------------- ONNX export installs nothing
EXPORT_OFFLINE = r"""
import importlib.abc, importlib.metadata, json, os, subprocess, sys
sys.path.insert(0, {root!r})
import export_model  # Paddle's import runs ldd: before the recording starts
started, popen_init = [], subprocess.Popen.__init__
def record(self, args, *a, **k):  # every process the export starts is recorded; pip is not run
    started.append(args if isinstance(args, str) else " ".join(map(str, args)))
    if "pip" in started[-1] or "install" in started[-1]:
        raise OSError("pip refused by the test")
    popen_init(self, args, *a, **k)
subprocess.Popen.__init__ = record
class Hide(importlib.abc.MetaPathFinder):  # a module Polygraphy's folding needs is 'missing'
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnx_graphsurgeon":
            raise ImportError("hidden by the test")
sys.meta_path.insert(0, Hide())
before = sorted(d.metadata["Name"] for d in importlib.metadata.distributions())
code = export_model.main({argv!r})
after = sorted(d.metadata["Name"] for d in importlib.metadata.distributions())
print(json.dumps(dict(code=code, started=started, new=sorted(set(after) - set(before)),
                      env=os.environ.get("POLYGRAPHY_AUTOINSTALL_DEPS"))))
"""


def test_onnx_export_installs_nothing(synthetic_root, r18_weights, tmp_path):
    """paddle2onnx turns Polygraphy's auto-install on; with a module Polygraphy wants hidden and pip
    unreachable, the export still writes model.onnx, starts no process (no pip), adds no package
    and leaves the variable as it found it (unset)."""
    pytest.importorskip("paddle2onnx")
    save = str(tmp_path / "run")
    fit_tiny(synthetic_root, save, r18_weights)
    out = str(tmp_path / "deployed")
    argv = [*TINY, "--model_path", os.path.join(save, "widget.pdparams"), "--save_dir", out, "--onnx"]
    env = {k: v for k, v in os.environ.items() if k != "POLYGRAPHY_AUTOINSTALL_DEPS"}
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="",
               POLYGRAPHY_INSTALL_CMD=f"{sys.executable} -c 'raise SystemExit(\"pip blocked\")'")
    proc = subprocess.run([sys.executable, "-c", EXPORT_OFFLINE.format(root=ROOT, argv=argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and os.path.isfile(os.path.join(out, "model.onnx"))
    assert not [cmd for cmd in report["started"] if "pip" in cmd or "install" in cmd], report
    assert report["new"] == [] and report["env"] is None, report
    assert "pip install" not in proc.stderr and "Attempting to install" not in proc.stderr
