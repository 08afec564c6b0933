"""The anomalib side of bench_vs_anomalib.py, run by the python of a separate virtual environment
that has anomalib 2.x and a CPU torch (never this project's environment: neither is a dependency
of the project). It imports nothing from the project.

    VENV_PYTHON benchmarks/anomalib_side.py prepare --work DIR --data ROOT --category bottle \
        --weights R18.npz --model padim|patchcore --image_size 224|256 --threads 2
    VENV_PYTHON benchmarks/anomalib_side.py time --work DIR --images LIST.json --precision fp32 \
        --threads 2 --warmup 2 --out RESULT.json

prepare: anomalib's own fit (Engine.fit on its MVTecAD datamodule: one epoch over train/good,
then its validation pass, which sets the post-processor's normalisation) and its own export
(Engine.export, ExportType.OPENVINO: preprocessing + network + scoring + normalisation in one IR,
dynamic input shape, as `anomalib export` writes it). The backbone is timm's resnet18 with this
project's ImageNet weights loaded into it (no hub download here, and both sides then start from
the same weights).
time: OpenVINOInferencer.predict(path) per image, batch 1 (the only batch it takes), each call
timed, at the precision given through OpenVINO's inference precision hint; in the same loop, its
two parts timed apart: reading the file (and scaling it), and the IR call.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OV_HINTS = {"fp32": "f32", "bf16": "bf16"}


def pre_processor(image_size):
    """256: anomalib's default (the whole image resized to 256x256). 224: this project's geometry
    (256x256, then the centre 224x224), so both sides score the same pixels at the same cost."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize
    steps = [Resize((256, 256), antialias=True)]
    if image_size != 256:
        steps.append(CenterCrop((image_size, image_size)))
    return PreProcessor(transform=Compose([*steps, Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]))


def load_backbone_weights(extractor, path):
    """The project's ResNet-18 layer1-3 weights (Paddle names, saved as .npz by the caller) into
    timm's features_only resnet18: BatchNorm's _mean/_variance are running_mean/running_var."""
    import torch
    arrays = np.load(path)
    renamed = {k.replace("._mean", ".running_mean").replace("._variance", ".running_var"): arrays[k]
               for k in arrays.files}
    state = extractor.state_dict()
    missing = [k for k in state if k not in renamed and not k.endswith("num_batches_tracked")]
    if missing:
        sys.exit(f"anomalib_side: weights {path} lack {missing[:3]}")
    extractor.load_state_dict({k: torch.from_numpy(renamed[k]) if k in renamed else v for k, v in state.items()})


def build_model(name, image_size):
    from anomalib.models import Padim, Patchcore
    if name == "padim":  # anomalib's defaults for resnet18: layer1-3, 100 random channels of 448
        return Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100,
                     pre_processor=pre_processor(image_size))
    # PatchCore with resnet18 instead of its default wide_resnet50_2, anomalib's other defaults.
    return Patchcore(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False,
                     coreset_sampling_ratio=0.01, num_neighbors=9, pre_processor=pre_processor(image_size))


def prepare(args):
    import torch
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    torch.set_num_threads(args.threads)
    torch.manual_seed(521)
    model = build_model(args.model, args.image_size)
    load_backbone_weights(model.model.feature_extractor.feature_extractor, args.weights)
    data = MVTecAD(root=args.data, category=args.category, train_batch_size=32, eval_batch_size=32, num_workers=0)
    engine = Engine(default_root_dir=args.work, logger=False, enable_progress_bar=False, accelerator="cpu")
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=args.work)
    info = {"xml": str(xml), "fit_s": fit_s, "export_s": time.perf_counter() - t0, "torch": torch.__version__}
    info.update(fixed_batch(str(xml)))
    with open(os.path.join(args.work, "prepared.json"), "w") as f:
        json.dump(info, f)
    print(json.dumps(info))


def fixed_batch(xml):
    """{} when the exported IR takes any number of images; else {"batch_fixed_at": n}. anomalib
    2.7.0's PatchCore export (torch 2.14's dynamo exporter) comes out with the batch fixed at its
    example input's 2, and OpenVINOInferencer.predict feeds one image: OpenVINO refuses that input.
    Reshaping the IR to batch 1 does not help: its bilinear resize has the 2 baked in ("[CPU]
    Interpolate node with name 'node_upsample_bilinear2d' only supports resize on spatial
    dimensions") when it is compiled."""
    import openvino as ov
    batch = ov.Core().read_model(xml).input(0).get_partial_shape()[0]
    return {} if batch.is_dynamic or batch.get_length() == 1 else {"batch_fixed_at": batch.get_length()}


def bf16_missing():
    import openvino as ov
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None
    return "this CPU has neither AMX-BF16 nor AVX512-BF16 (OpenVINO would emulate bf16)"


def time_inferencer(args):
    import anomalib
    import openvino as ov
    from anomalib.deploy import OpenVINOInferencer
    with open(os.path.join(args.work, "prepared.json")) as f:
        prepared = json.load(f)
    xml = prepared["xml"]
    with open(args.images) as f:
        paths = json.load(f)
    result = {"anomalib": anomalib.__version__, "openvino": ov.__version__, "precision": args.precision}
    if "batch_fixed_at" in prepared:
        result["skipped"] = (f"anomalib's exported IR takes exactly {prepared['batch_fixed_at']} images and "
                             f"OpenVINOInferencer.predict feeds one (OpenVINO refuses the input)")
    elif args.precision != "fp32" and bf16_missing():
        result["skipped"] = bf16_missing()
    else:
        os.chdir(args.work)  # OpenVINOInferencer writes ./openvino_cache
        config = {"INFERENCE_PRECISION_HINT": OV_HINTS[args.precision], "INFERENCE_NUM_THREADS": args.threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        inferencer = OpenVINOInferencer(path=xml, device="CPU", config=config)
        for path in paths[:args.warmup]:
            inferencer.predict(path)
        # Each image: predict() as a user calls it (timed whole), then its two parts timed apart
        # in the same loop, so a change of the machine's load falls on both alike: reading the
        # file and scaling it to [0, 1] NCHW, and the IR call (preprocessing, network, scoring,
        # normalisation).
        from anomalib.data.utils import read_image
        ms, scores, read_ms, ir_ms = [], [], [], []
        for path in paths:
            t0 = time.perf_counter()
            pred = inferencer.predict(path)
            t1 = time.perf_counter()
            image = inferencer.pre_process(read_image(path, as_tensor=False))
            t2 = time.perf_counter()
            inferencer.model({inferencer.input_blob.any_name: image})
            t3 = time.perf_counter()
            ms.append(1000 * (t1 - t0))
            read_ms.append(1000 * (t2 - t1))
            ir_ms.append(1000 * (t3 - t2))
            scores.append(float(np.asarray(pred.pred_score).reshape(-1)[0]))
        result.update(ms=ms, scores=scores, read_ms=read_ms, ir_ms=ir_ms)
    with open(args.out, "w") as f:
        json.dump(result, f)


# Where anomalib's PaDiM IR spends its time: the same IR cut after the channel selection (its
# preprocessing + network), and after the square root of the Mahalanobis distances (+ scoring);
# the rest is the upsampling, the 33x33 blur and the normalisation. Node names of its export.
PADIM_CUTS = (("preprocessing + network", "node_index_select"), ("+ Mahalanobis", "node_sqrt"))


def split_ir(args):
    """The whole IR and its cuts on the same images, alternated image by image -> medians (ms)."""
    import openvino as ov
    from anomalib.data.utils import read_image
    with open(os.path.join(args.work, "prepared.json")) as f:
        xml = json.load(f)["xml"]
    with open(args.images) as f:
        paths = json.load(f)
    core = ov.Core()
    model = core.read_model(xml)
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    config = {"INFERENCE_PRECISION_HINT": OV_HINTS[args.precision], "INFERENCE_NUM_THREADS": args.threads,
              "PERFORMANCE_HINT": "LATENCY"}
    parts = {name: core.compile_model(ov.Model([ops[node].output(0)], model.get_parameters()), "CPU", config)
             for name, node in PADIM_CUTS}
    parts["whole IR"] = core.compile_model(model, "CPU", config)
    images = [np.expand_dims(read_image(p, as_tensor=False).transpose(2, 0, 1), 0) for p in paths]
    times = {name: [] for name in parts}
    for n, image in enumerate(images):
        for name, compiled in parts.items():
            t0 = time.perf_counter()
            compiled({0: image})
            if n >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - t0))
    result = {name: float(np.median(t)) for name, t in times.items()}
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=["prepare", "time", "split"])
    parser.add_argument("--work", required=True)
    parser.add_argument("--data")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--weights")
    parser.add_argument("--model", default="padim", choices=["padim", "patchcore"])
    parser.add_argument("--image_size", type=int, default=224, choices=[224, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images")
    parser.add_argument("--precision", default="fp32", choices=list(OV_HINTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    {"prepare": prepare, "time": time_inferencer, "split": split_ir}[args.step](args)


if __name__ == "__main__":
    main()
