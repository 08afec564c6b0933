"""int8: the feature network quantised once, at fit time, by Paddle's own post-training
quantisation (paddle.static.quantization.PostTrainingQuantization), and run by Paddle Inference
on oneDNN's int8 kernels (config.enable_mkldnn_int8()).

Paddle 3.2.2's quantiser loads only old-IR programs (.pdmodel): on the PIR (.json) graphs that
paddle.jit.save writes by default it fails with `assert isinstance(program, Program)`
(paddle/base/framework.py). So the network is saved under paddle.pir_utils.OldIrGuard, quantised
with the conv2d weights per channel and the activations calibrated on CALIBRATION_IMAGES
training images, and the quantised .pdmodel + .pdiparams are kept as bytes in the model state
(state["int8_graph"], part of the model's version): evaluation, prediction, --update, export and
deployment all run that one graph, never a re-quantisation.
"""
import contextlib
import io
import logging
import os
import shutil
import tempfile

import numpy as np

from utils import UserError

# The first images of the fit (the sorted sample order, before any split among workers): the
# same calibration on every worker of a paddle.distributed fit.
CALIBRATION_IMAGES = 32
CALIBRATION_BATCH = 8
# Chosen by feature error against fp32 on bottle's 32 calibration images (docs/precision.md), mean
# relative error of the OrthoAD k=100 / PatchCore R18 features: abs_max 9.7% / 25.8%, hist 10.3% /
# 25.6%, avg 10.6% / 26.9%, mse 11.3% / 26.9%, KL 19.7% / not run. abs_max is also the cheapest (one pass).
ALGO = "abs_max"
ALGOS = ("avg", "abs_max", "mse", "hist", "KL")
# Methods whose accuracy int8 does not hold (the bounds: image AUROC / pixel AUROC / PRO
# within 0.01 / 0.005 / 0.01 of fp32) or that have no quantised network: refused at fit time.
# PatchCore R18 on bottle (benchmarks/bench_precision.py): features 26% mean relative error with
# every algorithm tried; PRO 0.8919 vs 0.9166 (1%) and 0.8946 vs 0.9181 (10%), pixel AUROC -0.0045
# / -0.0049. EfficientAD scores differences of networks it trains itself (teacher - student,
# student - autoencoder), where int8 error does not cancel; its quantisation is not built.
INT8_REFUSED = {
    "coreset": "--precision int8 is not offered for PatchCore: its int8 features lost 0.025 PRO against fp32 on "
               "bottle (the bound is 0.01; docs/precision.md): use fp32 or bf16",
    "efficientad": "--precision int8 is for the ResNet feature networks of PaDiM/OrthoAD; EfficientAD scores "
                   "differences of its own trained networks, which post-training quantisation is not measured to "
                   "hold: use fp32 or bf16",
}
# paddle2onnx's export of the quantised graph (QuantizeLinear/DequantizeLinear) and its run by
# ONNX Runtime / OpenVINO are not verified here: those backends run fp32 exports.
INT8_NO_ONNX = ("an int8 export runs on Paddle Inference (--backend paddle); the ONNX backends (onnxruntime, "
                "openvino) run fp32 exports: export with --precision fp32 --onnx for them")
MODEL_FILE, PARAMS_FILE = "model.pdmodel", "model.pdiparams"


@contextlib.contextmanager
def _quiet():
    """The old-IR save and the quantiser log every stage and draw progress bars on stderr: the
    fit shows its own one line instead."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def quiet_native_output():
    """oneDNN's int8 passes print what they quantised (`---    quantized 12 fused_conv2d ops`,
    ~30 lines) from C++ to stderr whatever disable_glog_info() says: file descriptors 1 and 2
    point at /dev/null while the predictor is built."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def quantize(net, input_shape, images, algo=ALGO):
    """`net` (eval mode) -> its int8 graph {"model", "params": uint8 arrays of the quantised
    .pdmodel / .pdiparams, "algo", "images": how many calibrated it}, calibrated on `images`
    (NCHW float32, the network's inputs)."""
    import paddle
    from paddle.pir_utils import OldIrGuard
    from paddle.static.quantization import PostTrainingQuantization
    if algo not in ALGOS:
        raise UserError(f"unknown int8 calibration algorithm {algo}; choose one of {', '.join(ALGOS)}")
    images = np.ascontiguousarray(images, np.float32)
    folder = tempfile.mkdtemp(prefix="ad_int8_")
    net.eval()
    spec = [paddle.static.InputSpec(shape=[None] + list(input_shape), dtype="float32", name="image")]
    try:
        # unique_name.guard: the same variable names in every process (a worker's graph = worker 0's).
        with _quiet(), OldIrGuard(), paddle.utils.unique_name.guard():
            paddle.jit.save(net, os.path.join(folder, "fp32", "model"), input_spec=spec)
            paddle.enable_static()
            try:
                ptq = PostTrainingQuantization(
                    executor=paddle.static.Executor(paddle.CPUPlace()), model_dir=os.path.join(folder, "fp32"),
                    model_filename=MODEL_FILE, params_filename=PARAMS_FILE,
                    data_loader=lambda: ({"image": images[i:i + CALIBRATION_BATCH]}
                                         for i in range(0, len(images), CALIBRATION_BATCH)),
                    batch_nums=-(-len(images) // CALIBRATION_BATCH), algo=algo, quantizable_op_type=["conv2d"],
                    onnx_format=True)
                ptq.quantize()
                ptq.save_quantized_model(os.path.join(folder, "int8"), model_filename="model",
                                         params_filename=PARAMS_FILE)
            finally:
                paddle.disable_static()
        graph = {}
        for key, name in (("model", MODEL_FILE), ("params", PARAMS_FILE)):
            with open(os.path.join(folder, "int8", name), "rb") as f:
                graph[key] = np.frombuffer(f.read(), np.uint8).copy()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    graph.update(algo=algo, images=int(len(images)))
    return graph


def write_graph(graph, folder):
    """The stored int8 graph -> (model file, params file) in `folder`."""
    paths = []
    for key, name in (("model", MODEL_FILE), ("params", PARAMS_FILE)):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(np.asarray(graph[key], np.uint8).tobytes())
        paths.append(path)
    return tuple(paths)


def feature_error(reference, quantised):
    """Mean relative error of int8 features against fp32: mean |q - r| / mean |r| over all outputs."""
    num = sum(float(np.abs(q - r).mean()) for r, q in zip(reference, quantised))
    den = sum(float(np.abs(r).mean()) for r in reference)
    return num / den
