"""Small shared helpers: user-facing errors, atomic file writes, seeding, tables, flags.

Everything that more than one entry script needs lives here so the scripts stay flat:
they parse flags and call into `pipeline`, `deploy`, `service`, `models`, `datasets` and `report`.
"""
import argparse
import contextlib
import csv
import ctypes
import io
import json
import os
import random
import shutil
import sys
import tempfile
import warnings

import numpy as np

# Paddle warns on import (paddle.utils.cpp_extension) that ccache is missing, a note for
# compiling C++ extensions that means nothing to users of this tool. Only that warning: set here,
# before any module imports paddle (models/__init__.py imports utils before its method modules).
warnings.filterwarnings("ignore", message=r"No ccache found", category=UserWarning)
# Paddle's C++ side logs graph-translation notes at warning level on every jit.save.
os.environ.setdefault("GLOG_minloglevel", "2")


def _mkl_avx2_on_amd():
    """Paddle's eager CPU kernels (conv, matmul: EfficientAD training) call MKL, which takes a
    slow generic path on AMD CPUs; this undocumented switch (read at MKL's first call) selects
    its AVX2 code, ~3x faster on the EPYC test machine. Intel CPUs are left alone."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(8192)
    except OSError:
        return
    if "AuthenticAMD" in info and " avx2" in info:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


_mkl_avx2_on_amd()


class UserError(Exception):
    """Bad input or environment: reported as one line on stderr, no traceback."""


def run_cli(main):
    """Run an entry point; UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if value.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


# The feature network's precision (models/precision.py): fp32/bf16/int8/auto on CPU, fp16 with TensorRT.
PRECISION_CHOICES = ("fp32", "bf16", "int8", "auto", "fp16")


def add_precision_arg(parser, default=None, what="the model's own (the one it was fitted at)"):
    parser.add_argument("--precision", default=default, choices=PRECISION_CHOICES,
                        help=f"feature network precision (default: {what}); bf16 needs a CPU with AMX-BF16 or "
                             f"AVX512-BF16, auto = bf16 where native else fp32; fp16/int8: GPU with TensorRT")


def add_inference_args(parser):
    """The Paddle Inference flags of the deployment entry points (infer.py, serve.py)."""
    parser.add_argument("--use_gpu", type=str2bool, default=False)
    parser.add_argument("--use_tensorrt", type=str2bool, default=False)
    add_precision_arg(parser)
    parser.add_argument("--enable_mkldnn", type=str2bool, default=True)
    parser.add_argument("--cpu_threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ir_optim", type=str2bool, default=True)


def inference_config(args):
    """add_inference_args' flags -> the keyword arguments of deploy.load_deployed."""
    return dict(use_gpu=args.use_gpu, enable_mkldnn=args.enable_mkldnn, cpu_threads=args.cpu_threads,
                ir_optim=args.ir_optim, precision=args.precision, use_tensorrt=args.use_tensorrt)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    import paddle
    paddle.seed(seed)


# ---------------------------------------------------------------- atomic writes
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; rename it onto `path` only on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + os.path.splitext(base)[1], dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a new temporary folder beside `path`; once the block has filled it, it takes
    `path`'s place, so that a reader (the service's watcher) sees the old folder or the new one,
    never half of one. An existing folder is swapped out in one step where the kernel allows it
    (renameat2 RENAME_EXCHANGE), else renamed aside just before the new one is renamed in: a gap of
    one rename in which `path` is missing, never one in which it is incomplete. The old folder is
    removed afterwards; on failure `path` is left as it was and the temporary folder removed."""
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        if os.path.isdir(path) and _exchange_paths(tmp, path):
            return  # tmp now holds the old folder: removed below
        aside = None
        if os.path.lexists(path):
            aside = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rename(path, aside)  # onto the empty placeholder: the name stays ours
        try:
            os.rename(tmp, path)
        except OSError:
            if aside:
                os.rename(aside, path)
            raise
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange_paths(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return rename2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_csv_atomic(path, header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def save_npy_atomic(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def append_line(path, line):
    """Append one line (a log record); a single write() call keeps lines whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")


def dumps_json(obj):
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def refuse_overwrite(paths, overwrite, hint="pass --overwrite to replace them"):
    """Never replace a user's earlier output without being told to."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"output already exists: {existing[0]}{more}; {hint}")


def load_pdparams(path, what, missing=None, marker=None, wrong=None):
    """paddle.load of a user-given file as numpy, every failure one UserError line: `missing`
    (default "<what> not found: <path>"), unreadable, and, with `marker`, a dict whose "format"
    differs (`wrong`, default "<path> is not <what>")."""
    import paddle
    if not os.path.isfile(path):
        raise UserError(missing or f"{what} not found: {path}")
    try:
        state = paddle.load(path, return_numpy=True)
    except Exception as err:  # paddle raises pickle, EOF, value and runtime errors for bad files
        raise UserError(f"cannot read {what} {path}: {err}") from None
    if marker is not None and (not isinstance(state, dict) or state.get("format") != marker):
        raise UserError(wrong or f"{path} is not {what}")
    return state


# ---------------------------------------------------------------- tables
def format_table(header, rows):
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value, digits=4):
    return "" if value is None else f"{value:.{digits}f}"


def peak_rss_mb():
    """Peak resident set size of this process in MB. Linux: VmHWM, the peak of this program's
    memory; ru_maxrss would also count the process before its exec (a child started by a large
    parent reports the parent's peak). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb():
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()
