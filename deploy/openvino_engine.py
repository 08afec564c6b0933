"""infer.py --backend openvino: the exported feature network (model.onnx, written by
export_model.py --onnx) run by OpenVINO's CPU plugin, behind the engine interface of
deploy/predictor.py (NCHW float32 batch -> list of float32 outputs).

Precision goes through OpenVINO's inference precision hint. fp32 is set explicitly: on a CPU
with native bf16 (AMX or AVX512-BF16) the plugin's own default is bf16, which would silently
move the scores away from those the thresholds were calibrated on.
"""
import numpy as np

from utils import UserError

# --precision -> OpenVINO's element type name for the hint; int8 needs a quantised (NNCF) model.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def bf16_missing(core):
    """None when OpenVINO's CPU plugin runs bf16 natively here, else what the CPU lacks (one line).
    OpenVINO lists BF16 among the CPU's optimisation capabilities only where the instructions
    exist (AMX-BF16 or AVX512-BF16); elsewhere it would emulate bf16, slower than fp32."""
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None
    return "this CPU has neither AMX-BF16 nor AVX512-BF16 (OpenVINO would emulate bf16, slower than fp32)"


class OpenVinoEngine:
    """A compiled OpenVINO model on the CPU; one synchronous infer request, reused."""

    def __init__(self, onnx_path, cpu_threads=None, precision="fp32"):
        try:
            import openvino as ov
        except ImportError:
            raise UserError("--backend openvino needs openvino (pip install openvino)") from None
        if precision not in PRECISION_HINTS:
            raise UserError(f"--backend openvino runs {' or '.join(PRECISION_HINTS)}, not --precision {precision}")
        core = ov.Core()
        if precision == "bf16":
            missing = bf16_missing(core)
            if missing:
                raise UserError(f"--precision bf16 refused: {missing}; use fp32")
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if cpu_threads:
            config["INFERENCE_NUM_THREADS"] = int(cpu_threads)
        try:
            self.compiled = core.compile_model(core.read_model(onnx_path), "CPU", config)
        except RuntimeError as err:
            raise UserError(f"OpenVINO cannot load {onnx_path}: {str(err).strip().splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def __call__(self, images):
        images = np.ascontiguousarray(images, np.float32)
        # share_outputs=False: the request's output buffers are reused by the next call, and
        # Detector.features keeps each call's outputs until the batch is scored.
        results = self.request.infer({0: images}, share_inputs=True, share_outputs=False)
        return [np.asarray(results[port], np.float32) for port in self.compiled.outputs]
