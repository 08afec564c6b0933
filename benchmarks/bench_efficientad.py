"""EfficientAD per-image latency, batch 1, 256x256 bottle test images: the eager graph
(teacher + student + autoencoder -> local/global maps) and the full detector (maps ->
normalised, upsampled anomaly map), small and medium, beside the same graph through Paddle
Inference + oneDNN. Latency does not depend on the weight values, so a size without a trained
model (--small / --medium: a bottle.pdparams from train.py) is timed with random weights.
Prints figures; asserts nothing.

    python benchmarks/bench_efficientad.py [--small output/efficientad_small/bottle.pdparams] [--images 20]
"""
import argparse

import numpy as np

from common import DATA, cpu_header, require_shared, time_per_image

import paddle  # noqa: E402
from datasets import test_samples  # noqa: E402
from datasets.mvtec import iterate_batches  # noqa: E402
from datasets.transforms import Preprocess  # noqa: E402
from models import load_model  # noqa: E402
from models.backbone import EagerEngine, make_engine  # noqa: E402
from models.efficientad import EfficientAD  # noqa: E402
from models.pdn import IMAGE_SIZE, EfficientADNet  # noqa: E402
from models.postprocess import Detector  # noqa: E402


def build(size, model_path):
    """-> (feature net, stats, what the weights are)."""
    if model_path:
        state = load_model(model_path)
        return EfficientAD(state["config"]).feature_net(state), state["stats"], f"trained ({model_path})"
    paddle.seed(0)
    net = EfficientADNet(size)
    net.eval()
    return net, {"q_local": np.array([0.0, 1.0]), "q_global": np.array([0.0, 1.0])}, "random weights"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", default=None, help="trained small model (.pdparams)")
    parser.add_argument("--medium", default=None, help="trained medium model (.pdparams)")
    parser.add_argument("--images", type=int, default=20, help="bottle test images timed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    print(cpu_header())
    paddle.set_device("cpu")
    samples = test_samples(DATA, "bottle")[: args.images]
    images = np.concatenate([b[1] for b in iterate_batches(samples, 8, Preprocess(IMAGE_SIZE, IMAGE_SIZE))])
    for size, path in (("small", args.small), ("medium", args.medium)):
        net, stats, weights = build(size, path)
        eager = EagerEngine(net)
        detector = Detector.for_method(EfficientAD, eager, stats, IMAGE_SIZE)
        graph_ms = 1000 * time_per_image(eager, images)
        detector_ms = 1000 * time_per_image(detector.raw, images)
        inference = make_engine(net, (3, IMAGE_SIZE, IMAGE_SIZE), cpu_threads=args.threads, enable_mkldnn=True)
        inference_ms = 1000 * time_per_image(inference, images)
        params = sum(int(np.prod(p.shape)) for p in net.parameters()) / 1e6
        print(f"[efficientad {size}] {weights}, {params:.1f} M parameters, {len(images)} images, batch 1")
        print(f"  eager graph     {graph_ms:8.1f} ms/img")
        print(f"  eager detector  {detector_ms:8.1f} ms/img  (graph + quantile maps, 256x256 upsampling)")
        print(f"  Paddle Inference + oneDNN, {args.threads} threads: {inference_ms:8.1f} ms/img")


if __name__ == "__main__":
    main()
