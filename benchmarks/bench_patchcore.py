"""PatchCore timings on one category, all measured in this run: coreset selection time
(projection + exact greedy k-center) at --coreset_ratio of the training patches, scoring
latency per image (nearest-neighbour patch scores + re-weighted image score, batch 1, with each exact search) and its
ratio to the backbone forward pass (Paddle Inference, batch 1).

    python benchmarks/bench_patchcore.py --data_path ../shared/data/mvtec_lite --category bottle \
        --backbone_weights ../shared/weights/resnet18_imagenet_layer1-3.pdparams
"""
import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import cpu_header  # noqa: E402

from datasets import iterate_batches, test_samples, train_samples
from datasets.transforms import Preprocess
from models.patchcore import PatchCore
from utils import run_cli, set_seed


def per_image_ms(fn, items):
    fn(items[0])  # warm-up: engine caches, bank index
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return 1000 * (time.perf_counter() - t0) / len(items)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="../shared/data/mvtec_lite")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--backbone_weights", default=None)
    parser.add_argument("--coreset_ratio", type=float, default=0.1)
    parser.add_argument("--num_neighbors", type=int, default=9)
    parser.add_argument("--images", type=int, default=20, help="test images timed")
    parser.add_argument("--seed", type=int, default=521)
    args = parser.parse_args(argv)
    print(cpu_header())
    set_seed(args.seed)
    config = {"method": "coreset", "arch": args.arch, "seed": args.seed, "resize": 256, "crop_size": 224,
              "coreset_ratio": args.coreset_ratio, "num_neighbors": args.num_neighbors}
    method = PatchCore(config)
    _, engine = method.feature_engine(args.backbone_weights, {"engine": "inference"})
    train = train_samples(args.data_path, args.category)
    parts = method.training_rows(engine, (x for _, x, _, _ in iterate_batches(train, 8, Preprocess())))
    n_patches = sum(len(p) for p in parts)

    t0 = time.perf_counter()
    bank, _ = method.select_coreset(parts)
    select_s = time.perf_counter() - t0
    print(f"coreset selection: {len(bank)} of {n_patches} patches ({args.coreset_ratio:g}) in {select_s:.2f} s "
          f"({os.cpu_count()} cores)")

    tests = test_samples(args.data_path, args.category)[:args.images]
    images = [x[i:i + 1] for _, x, _, _ in iterate_batches(tests, 8, Preprocess()) for i in range(len(x))]
    forward_ms = per_image_ms(engine, images)
    outputs = [engine(x) for x in images]
    stats = {"memory_bank": bank}
    print(f"backbone forward: {forward_ms:.1f} ms/image")
    kinds = ["brute", "grouped"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    for kind in kinds:
        m = PatchCore(dict(config, nn_search=kind))
        score_ms = per_image_ms(lambda out, m=m: m.image_score(out, m.score(out, stats), stats), outputs)
        print(f"scoring ({kind} search, bank {bank.shape[0]}x{bank.shape[1]}): {score_ms:.1f} ms/image, "
              f"{score_ms / forward_ms:.2f}x the backbone forward, "
              f"{m.nearest_index(stats).distance_share():.1%} of the distances computed")
    return 0


if __name__ == "__main__":
    run_cli(main)
