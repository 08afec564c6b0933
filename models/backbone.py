"""ResNet backbones from paddle.vision.models, weight loading, and the feature engines.

The feature network (backbone layers + resize/concat + the method's projection) runs
through Paddle Inference for fitting, evaluation, prediction and deployment alike: one
feature path keeps scores identical across entry points, and the inference engine with
oneDNN is ~4x faster than eager mode on CPU. `engine='eager'` runs the same network in
dygraph (for debugging, GPU without Paddle Inference, and parity tests).
"""
import contextlib
import os
import shutil
import tempfile

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from models.precision import INT8_NEEDS_FIT, check as check_precision
from models.quantize import feature_error, quantize, quiet_native_output, write_graph
from utils import UserError, load_pdparams

ARCHS = ("resnet18", "resnet50", "wide_resnet50_2")
# Output channels of layer1..layer4 for each architecture.
LAYER_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "wide_resnet50_2": (256, 512, 1024, 2048),
}
STEM = ("conv1", "bn1")
# Shipped in the repository so that a machine without internet runs with no flags: torchvision's
# ImageNet ResNet-18 (BSD-3-Clause), stem + layer1-3, each BatchNorm folded into an exact affine
# (weights/README.md). Other archs download paddle.vision's weights.
BUNDLED_WEIGHTS = {"resnet18": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                            "weights", "resnet18_imagenet_layer1-3.pdparams")}


def build_resnet(arch):
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch}; choose one of {', '.join(ARCHS)}")
    from paddle.vision import models
    return getattr(models, arch)(pretrained=False)


def _official_state_dict(arch):
    """The official Paddle ImageNet weights (paddle.vision's URLs), downloaded and cached."""
    from paddle.utils.download import get_weights_path_from_url
    from paddle.vision.models.resnet import model_urls
    url, md5 = model_urls[arch]
    try:
        path = get_weights_path_from_url(url, md5)
    except Exception as err:  # any network failure: offline, proxy, DNS
        raise UserError(f"cannot download ImageNet weights for {arch} ({type(err).__name__}); "
                        f"pass a local file with --backbone_weights PATH") from None
    return paddle.load(path)


def read_backbone_weights(arch, weights_path, layers):
    """-> the stem and `layers` entries of a full or partial state dict, checked against `arch`.
    Anything else in the file (layer4, fc) is ignored."""
    if weights_path:
        state = load_pdparams(weights_path, "backbone weights")
        if not isinstance(state, dict):
            raise UserError(f"backbone weights {weights_path} are not a state dict")
    elif arch in BUNDLED_WEIGHTS:
        state = load_pdparams(BUNDLED_WEIGHTS[arch], "bundled backbone weights")
    else:
        state = _official_state_dict(arch)
    wanted = build_resnet(arch).state_dict()
    needed = [k for k in wanted if k.split(".")[0] in STEM + tuple(layers)]
    missing = sorted({k.split(".")[0] for k in needed if k not in state})
    if missing:
        raise UserError(f"backbone weights {weights_path or arch} lack {', '.join(missing)} "
                        f"(needed: {', '.join(STEM + tuple(layers))}); is this a {arch} state dict?")
    for k in needed:
        if tuple(state[k].shape) != tuple(wanted[k].shape):
            raise UserError(f"backbone weights {weights_path or arch}: {k} has shape "
                            f"{list(state[k].shape)}, {arch} expects {list(wanted[k].shape)}")
    return {k: state[k] for k in needed}


class ResNetFeatures(nn.Layer):
    """Stem + layer1..layerN of a ResNet, returning the requested layers' outputs."""

    def __init__(self, arch, layers=("layer1", "layer2", "layer3")):
        super().__init__()
        resnet = build_resnet(arch)
        self.arch = arch
        self.layers = tuple(layers)
        last = max(int(name[-1]) for name in self.layers)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.blocks = nn.LayerList([getattr(resnet, f"layer{i}") for i in range(1, last + 1)])

    def load_pretrained(self, weights_path):
        """Weights are named as in paddle.vision's ResNet; layerN lives at blocks.(N-1) here."""
        state = read_backbone_weights(self.arch, weights_path, [f"layer{i + 1}" for i in range(len(self.blocks))])
        renamed = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            renamed[f"blocks.{int(head[5:]) - 1}.{rest}" if head.startswith("layer") else key] = value
        self.set_state_dict(renamed)
        return self

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if f"layer{i + 1}" in self.layers:
                outs.append(x)
        return outs

    def channels(self):
        return [LAYER_CHANNELS[self.arch][int(n[-1]) - 1] for n in self.layers]


LAYER3_STRIDE = 16  # the deepest layer the methods read: every layer's grid divides the image exactly


def check_backbone_input(input_shape, method):
    """A network input the ResNet layers tile exactly: each side a multiple of layer3's stride
    (PaDiM's map grid is then H/4 x W/4, PatchCore's H/8 x W/8, every layer aligned with it)."""
    h, w = input_shape[-2:]
    if h % LAYER3_STRIDE or w % LAYER3_STRIDE:
        raise UserError(f"{method} needs network inputs whose sides are multiples of {LAYER3_STRIDE} (the "
                        f"backbone's stride), got {h}x{w}: choose --image_size / --tile / --crop_size to fit")


def concat_to_first(features):
    """Nearest-upsample every map to the first one's resolution and concatenate (PaDiM embedding)."""
    size = features[0].shape[-2:]
    return paddle.concat([features[0]] + [F.interpolate(f, size=size, mode="nearest") for f in features[1:]], axis=1)


# ---------------------------------------------------------------- engines
def save_static(net, path_prefix, input_shape):
    """paddle.jit.save with a dynamic batch; Paddle 3 writes .json (PIR), Paddle 2 .pdmodel."""
    net.eval()
    spec = [paddle.static.InputSpec(shape=[None] + list(input_shape), dtype="float32", name="image")]
    paddle.jit.save(net, path_prefix, input_spec=spec)
    return model_file_for(path_prefix)


def model_file_for(path_prefix):
    for ext in (".json", ".pdmodel"):
        if os.path.isfile(path_prefix + ext):
            return path_prefix + ext
    raise UserError(f"no static model at {path_prefix}.json or {path_prefix}.pdmodel")


def inference_config(model_file, params_file, use_gpu=False, enable_mkldnn=True, cpu_threads=None,
                     ir_optim=True, precision="fp32", use_tensorrt=False, gpu_mem_mb=500):
    from paddle import inference
    config = inference.Config(model_file, params_file)
    if use_gpu:
        if not paddle.device.is_compiled_with_cuda():
            raise UserError("--use_gpu needs a GPU build of Paddle (pip install paddlepaddle-gpu); "
                            "this one is CPU-only")
        config.enable_use_gpu(gpu_mem_mb, 0)
        if precision != "fp32" and not use_tensorrt:
            raise UserError(f"--precision {precision} on GPU runs through TensorRT: add --use_tensorrt True")
        if use_tensorrt:
            prec = {"fp32": inference.PrecisionType.Float32, "fp16": inference.PrecisionType.Half,
                    "int8": inference.PrecisionType.Int8}[precision]
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=32, min_subgraph_size=3,
                                          precision_mode=prec, use_static=False, use_calib_mode=precision == "int8")
    else:
        if use_tensorrt:
            raise UserError("--use_tensorrt needs --use_gpu=True and a GPU build of Paddle")
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(cpu_threads or os.cpu_count() or 1)
        if enable_mkldnn:
            config.enable_mkldnn()
        if precision != "fp32":
            _set_cpu_precision(config, precision, enable_mkldnn)
    config.switch_ir_optim(ir_optim)
    # No enable_memory_optim(): Paddle 3.2 then fails to create a predictor for these PIR
    # graphs (pass_result_info.h:48), with or without oneDNN.
    config.disable_glog_info()
    return config


def _set_cpu_precision(config, precision, enable_mkldnn):
    """bf16 runs through oneDNN's bf16 kernels, int8 (a graph quantised by models/quantize.py)
    through its int8 ones; which precisions this CPU may use is decided before
    (models/precision.py), this only configures it."""
    if precision not in ("bf16", "int8"):
        check_precision(precision)  # fp16 on CPU: the one-line refusal
    if not enable_mkldnn:
        raise UserError(f"--precision {precision} runs on oneDNN's {precision} kernels: keep --enable_mkldnn True")
    if precision == "bf16":
        config.enable_mkldnn_bfloat16()
    else:  # without it the quantised graph runs its fake-quant ops in fp32, ~5x slower
        config.enable_mkldnn_int8()


class InferenceEngine:
    """A Paddle Inference predictor: NCHW float32 batch -> list of float32 outputs."""

    def __init__(self, model_file, params_file, **config_kwargs):
        from paddle import inference
        try:
            config = inference_config(model_file, params_file, **config_kwargs)
            with quiet_native_output() if config_kwargs.get("precision") == "int8" else contextlib.nullcontext():
                self.predictor = inference.create_predictor(config)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"Paddle Inference cannot load {model_file}: {str(err).strip().splitlines()[-1]}") from None
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    def __call__(self, images):
        self.input.reshape(list(images.shape))
        self.input.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        return [o.copy_to_cpu() for o in self.outputs]


class EagerEngine:
    def __init__(self, net):
        self.net = net
        self.net.eval()

    @paddle.no_grad()
    def __call__(self, images):
        out = self.net(paddle.to_tensor(np.ascontiguousarray(images, dtype=np.float32)))
        out = out if isinstance(out, (list, tuple)) else [out]
        return [o.numpy() for o in out]


def run_in_chunks(engine, images, chunk=1):
    """An engine over `images` in chunks of `chunk`, outputs concatenated: batch 1 is the fastest
    Paddle Inference shape on CPU (oneDNN, cache-resident)."""
    parts = [engine(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def make_engine(net, input_shape, engine="inference", calibration=None, **config_kwargs):
    """Compile `net` for the chosen engine. The inference engine goes through the same
    jit.save files that export_model.py writes, so training and deployment share one graph.
    At int8 it runs the net's quantised graph (net.int8_graph, set by the method's feature_net
    from the model), made here first from `calibration` images when a fit asks for it."""
    if engine == "eager":
        if config_kwargs.get("precision", "fp32") != "fp32":
            raise UserError(f"--engine eager runs fp32; --precision {config_kwargs['precision']} runs on the "
                            f"inference engine (the default)")
        return EagerEngine(net)
    if engine != "inference":
        raise UserError(f"unknown --engine {engine}; choose inference or eager")
    folder = tempfile.mkdtemp(prefix="ad_engine_")
    try:
        if config_kwargs.get("precision") == "int8" and not config_kwargs.get("use_gpu"):  # GPU: TensorRT's
            return _int8_engine(net, input_shape, calibration, folder, config_kwargs)
        model_file = save_static(net, os.path.join(folder, "model"), input_shape)
        return InferenceEngine(model_file, os.path.join(folder, "model.pdiparams"), **config_kwargs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _int8_engine(net, input_shape, calibration, folder, config_kwargs):
    """The inference engine over net.int8_graph; with `calibration` (a fit) the graph is made
    first, its feature error against fp32 on the calibration images said in one line and kept."""
    graph = getattr(net, "int8_graph", None)
    if graph is None:
        if calibration is None:
            raise UserError(INT8_NEEDS_FIT.format(own="fp32"))
        graph = quantize(net, input_shape, calibration)
        reference = run_in_chunks(make_engine(net, input_shape, **dict(config_kwargs, precision="fp32")), calibration)
        engine = InferenceEngine(*write_graph(graph, folder), **config_kwargs)
        graph["feature_error"] = feature_error(reference, run_in_chunks(engine, calibration))
        net.int8_graph = graph
        print(f"int8: feature network quantised ({graph['algo']}, {graph['images']} calibration images); "
              f"features {100 * graph['feature_error']:.1f}% mean relative error against fp32 on them")
        return engine
    return InferenceEngine(*write_graph(graph, folder), **config_kwargs)
