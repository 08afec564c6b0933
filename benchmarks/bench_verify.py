"""Cost of the image check train.py runs before the fit (datasets.verify.check_samples: PNG CRCs,
other formats decoded, JPEG at 1/8 scale) against decoding and preprocessing the same images as
the fit does (datasets.transforms.Preprocess.load). Both single-threaded, files warm in the page cache.

    python benchmarks/bench_verify.py [--data_path ../shared/data/mvtec_lite --category bottle] [--jpeg]

--jpeg: also time the same images re-encoded as JPEG (quality 95) in a temporary folder.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import cpu_header  # noqa: E402

from PIL import Image  # noqa: E402

from datasets import Sample, test_samples, train_samples  # noqa: E402
from datasets.transforms import Preprocess, load_rgb  # noqa: E402
from datasets.verify import check_samples  # noqa: E402
from utils import run_cli  # noqa: E402


def seconds(fn, repeat):
    fn()  # warm-up: page cache, numba's first call
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def compare(label, samples, repeat):
    preprocess = Preprocess()
    check = seconds(lambda: check_samples(samples, workers=1), repeat)
    decode = seconds(lambda: [preprocess.load(s.image_path) for s in samples], repeat)
    n = len(samples)
    print(f"{label:<28} {n:>5} files  check {1000 * check / n:6.2f} ms/img  decode+preprocess "
          f"{1000 * decode / n:6.2f} ms/img  check/decode {check / decode:5.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "..", "shared", "data", "mvtec_lite"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=int, default=0, help="first N training images (0: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jpeg", action="store_true")
    args = parser.parse_args(argv)
    print(cpu_header())
    train = train_samples(args.data_path, args.category)[:args.images or None]
    size = Image.open(train[0].image_path).size
    compare(f"train PNG {size[0]}x{size[1]}", train, args.repeat)
    masked = [s for s in test_samples(args.data_path, args.category) if s.mask_path][:args.images or None]
    compare("test PNG + mask sizes", masked, args.repeat)
    if args.jpeg:
        folder = tempfile.mkdtemp(prefix="bench_verify.")
        try:
            jpegs = []
            for s in train:
                path = os.path.join(folder, os.path.basename(s.image_path)[:-4] + ".jpg")
                load_rgb(s.image_path).save(path, quality=95)
                jpegs.append(Sample(path, "good", 0))
            compare(f"train JPEG {size[0]}x{size[1]}", jpegs, args.repeat)
        finally:
            shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    run_cli(main)
