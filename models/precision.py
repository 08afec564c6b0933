"""The feature network's numeric precision on CPU: what this CPU runs natively, and which
precision a run uses.

    fp32  every CPU (the default; the reproduction's numbers and the parity tests are fp32)
    bf16  oneDNN bf16 kernels (config.enable_mkldnn_bfloat16()): native with AMX-BF16
          (Intel Xeon 4th gen+) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4+)
    int8  oneDNN int8 kernels (config.enable_mkldnn_int8()) over the network quantised at fit
          time (models/quantize.py): native with AVX2 (u8s8 kernels; measured ~2x faster than
          fp32 on an AVX2-only AMD EPYC, docs/precision.md), faster still with AVX512-VNNI,
          AVX-VNNI or AMX-INT8. Only a model fitted at int8 has the quantised graph
          (PaDiM/OrthoAD; PatchCore and EfficientAD refuse int8: models/quantize.py).
    auto  bf16 where native, else fp32

Emulated bf16 is slower than fp32 and no one wants it by accident: a precision this CPU lacks is
refused with one line naming what is missing. The CPU's flags come from /proc/cpuinfo (what
`lscpu` prints); AD_CPU_FLAGS="avx512_bf16 ..." replaces them, for the tests and for a user
whose kernel hides flags. It changes only this module's decision: Paddle's oneDNN still looks at
the real CPU, and where it has no bf16 kernels (AVX2-only CPUs) it runs fp32 kernels, which the
note printed then says.

A model records the precision its statistics / memory bank were fitted at (config["precision"],
part of its version); evaluation, prediction, export and deployment use it unless told
otherwise, and say in one line when told otherwise (`for_model`).
"""
import os
import sys

from utils import PRECISION_CHOICES, UserError

PRECISIONS = ("fp32", "bf16", "int8")
GPU_ONLY = ("fp16",)  # TensorRT (--use_gpu --use_tensorrt)
FLAGS_ENV = "AD_CPU_FLAGS"
# Any one of these makes the precision native (lscpu / /proc/cpuinfo names).
NATIVE_FLAGS = {"bf16": ("amx_bf16", "avx512_bf16"), "int8": ("amx_int8", "avx512_vnni", "avx_vnni", "avx2")}
HEADER_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
                "amx_int8")
# int8 needs the calibration made at fit time (the quantised graph lives in the model).
INT8_NEEDS_FIT = ("--precision int8 runs the feature network quantised at fit time, which this model lacks (it was "
                  "fitted at {own}): fit it with train.py --precision int8")
_printed = set()


def cpu_flags():
    """-> (set of CPU flags, where they came from): AD_CPU_FLAGS (space or comma separated) when
    set, else the first processor's flags in /proc/cpuinfo (empty where there is none)."""
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return set(override.replace(",", " ").split()), FLAGS_ENV
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split()), "/proc/cpuinfo"
    except OSError:
        pass
    return set(), "no /proc/cpuinfo"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def paddle_support():
    """Paddle's own view: {"bf16": core.supports_bfloat16(), "int8": core.supports_int8()}; None
    where this Paddle lacks the function."""
    from paddle.base import core
    return {name: (getattr(core, fn)() if hasattr(core, fn) else None)
            for name, fn in (("bf16", "supports_bfloat16"), ("int8", "supports_int8"))}


def missing(precision):
    """None if this CPU runs `precision` natively, else one phrase saying what it lacks."""
    if precision not in NATIVE_FLAGS:
        return None
    flags, source = cpu_flags()
    wanted = NATIVE_FLAGS[precision]
    if not flags.intersection(wanted):
        return f"this CPU lacks {' and '.join(wanted)} ({source})"
    if source != FLAGS_ENV and paddle_support()[precision] is False:
        return f"this Paddle build does not run {precision} on this CPU (paddle.base.core.supports_{precision}() is False)"
    return None


def native(precision):
    return missing(precision) is None


def header_line():
    """One line for every benchmark's header: the CPU, its relevant flags, what runs natively."""
    flags, source = cpu_flags()
    shown = " ".join(f if f in flags else f"-{f}" for f in HEADER_FLAGS)
    support = paddle_support()
    return (f"cpu: {cpu_model()}, {os.cpu_count()} logical CPUs; flags ({source}, '-' = absent): {shown}; "
            f"native bf16: {'yes' if native('bf16') else 'no'}, native int8: {'yes' if native('int8') else 'no'}; "
            f"Paddle supports_bfloat16 {support['bf16']}, supports_int8 {support['int8']}")


def _note(text, once=False):
    if once and text in _printed:
        return
    _printed.add(text)
    print(f"note: {text}", file=sys.stderr)


def check(precision, use_gpu=False):
    """Refuse, in one line, a precision this machine does not run natively; -> precision."""
    if precision not in PRECISIONS + GPU_ONLY:
        raise UserError(f"unknown --precision {precision}; choose one of {', '.join(PRECISION_CHOICES)}")
    if use_gpu:  # the GPU path: TensorRT's fp16 / int8, plain fp32
        if precision == "bf16":
            raise UserError("--precision bf16 is a CPU precision here (oneDNN); on GPU use --use_tensorrt True "
                            "with --precision fp16")
        return precision
    if precision in GPU_ONLY:
        raise UserError(f"--precision {precision} is a GPU precision (TensorRT); on CPU use fp32, bf16 or auto")
    lacks = missing(precision)
    if lacks:
        raise UserError(f"--precision {precision} needs native {precision} and {lacks}: emulated {precision} is "
                        f"slower than fp32; use --precision fp32 (or auto)")
    if precision == "bf16" and os.environ.get(FLAGS_ENV) is not None and paddle_support()["bf16"] is False:
        _note(f"{FLAGS_ENV} claims bf16, but Paddle's oneDNN has no bf16 kernels for this CPU "
              f"(supports_bfloat16() is False): it runs fp32 kernels", once=True)
    return precision


def resolve(requested, use_gpu=False):
    """--precision of a new fit: None -> fp32, auto -> bf16 where native (never on GPU), else
    checked as given."""
    if requested in (None, "fp32"):
        return "fp32"
    if requested == "auto":
        return "bf16" if not use_gpu and native("bf16") else "fp32"
    return check(requested, use_gpu)


def recorded(config):
    """The precision a model was fitted at (models written before precisions existed: fp32)."""
    return config.get("precision") or "fp32"


def for_model(requested, config, use_gpu=False, runs_here=True, default=None):
    """The precision to run a fitted model at: `default` (an export's recorded one) or else its
    own, unless `requested` says otherwise, which is said in one line (its thresholds were
    calibrated at its own). runs_here=False: the choice is not checked here (an export records it
    for another machine; an ONNX runtime checks it against the CPU itself)."""
    own = recorded(config)
    if requested is None:
        chosen = "fp32" if use_gpu else default or own
        lacks = runs_here and not use_gpu and missing(chosen)
        if lacks:
            what = "this model was fitted" if chosen == own else "this export runs"
            raise UserError(f"{what} at {chosen}, and {lacks}: pass --precision fp32 to run it at fp32 "
                            f"(its thresholds were calibrated at {own})")
    elif requested == "auto" and not runs_here:
        chosen = own
    else:
        chosen = requested if requested in PRECISIONS and not runs_here else resolve(requested, use_gpu)
    if chosen == "int8" and own != "int8" and not use_gpu:  # GPU int8: TensorRT calibrates itself
        raise UserError(INT8_NEEDS_FIT.format(own=own))
    if runs_here and chosen != "fp32":
        check(chosen, use_gpu)
    if chosen != own:
        _note(f"running at {chosen} a model fitted at {own}: its statistics and thresholds were calibrated at "
              f"{own}, so scores move slightly")
    return chosen
