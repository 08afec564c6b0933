"""A small synthetic data set in MVTec AD layout, so the TIPC chain runs without MVTec or network.

    python test_tipc/make_synthetic_mvtec.py --out test_tipc/data/mvtec --category bottle

<out>/<category>/train/good/*.png, test/{good,broken_large,contamination}/*.png and
ground_truth/{broken_large,contamination}/<stem>_mask.png: MVTec bottle's folder names, so the
TIPC configs point at the same folders whichever data prepare.sh found. Normal images are a
smooth random colour field with a centred ring (an object on a background, like the bottle);
defects are a bright line (broken_large) or a dark blob (contamination) painted on top, with
their masks. Seeded: the same flags give
the same files. The chain checks that train -> eval -> export -> infer run, not the accuracy, but
the defects are easy enough that a working model still scores them above the normal images.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

DEFECTS = ("broken_large", "contamination")


def normal_image(rng, size):
    small = rng.rand(size // 32, size // 32, 3) * 0.3 + 0.35
    field = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    img = Image.fromarray(field.copy())
    draw = ImageDraw.Draw(img)
    c, r = size / 2 + rng.uniform(-2, 2, 2), size * 0.3
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=(40, 70, 40), width=max(2, size // 24))
    noise = rng.normal(0, 4, (size, size, 3))
    return np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)


def add_defect(rng, img, kind):
    size = img.shape[0]
    canvas, mask = Image.fromarray(img), Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    if kind == "broken_large":
        x0, y0 = rng.randint(size // 4, size // 2, 2)
        x1, y1 = x0 + rng.randint(size // 8, size // 4), y0 + rng.randint(-size // 8, size // 8)
        width = max(2, size // 40)
        draw.line([x0, y0, x1, y1], fill=(245, 245, 235), width=width)
        mdraw.line([x0, y0, x1, y1], fill=255, width=width)
    else:
        x, y = rng.randint(size // 4, 3 * size // 4, 2)
        r = rng.randint(size // 24, size // 12)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(30, 20, 10))
        mdraw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(canvas), np.asarray(mask)


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_category(out, category, n_train, n_test, size, seed):
    rng = np.random.RandomState(seed)
    root = os.path.join(out, category)
    for i in range(n_train):
        save(os.path.join(root, "train", "good", f"{i:03d}.png"), normal_image(rng, size))
    for i in range(n_test):
        save(os.path.join(root, "test", "good", f"{i:03d}.png"), normal_image(rng, size))
    for kind in DEFECTS:
        for i in range(n_test):
            img, mask = add_defect(rng, normal_image(rng, size), kind)
            save(os.path.join(root, "test", kind, f"{i:03d}.png"), img)
            save(os.path.join(root, "ground_truth", kind, f"{i:03d}_mask.png"), mask)
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="data root to write (<out>/<category>/...)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--n_train", type=int, default=40, help="train/good images")
    p.add_argument("--n_test", type=int, default=3, help="test images per folder (good and each defect)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = make_category(args.out, args.category, args.n_train, args.n_test, args.size, args.seed)
    print(f"wrote synthetic MVTec-layout category {root}: {args.n_train} train, "
          f"{args.n_test} test per folder ({', '.join(('good',) + DEFECTS)})")


if __name__ == "__main__":
    main()
