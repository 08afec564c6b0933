"""The flags of train.py / eval.py / predict.py / export_model.py and what they resolve to: the
model's config, the runtime settings, where models live. The entry scripts build their parsers
from these adders and call `parse`."""
import argparse
import os

from pipeline import scaleout
from datasets import resolve_data_args
from datasets.transforms import parse_image_size
from models import build_method, check_geometry
from models.backbone import ARCHS
from models.parallel import set_cpu_threads
from report.results import run_name
from utils import UserError, add_precision_arg, str2bool

# efficientad --lite: 128 px student crops, 600 steps in a 13 min time box (bottle, 2 CPU cores:
# 1.3 s/step; teacher pass and evaluation bring the run to ~15 min)
LITE_STEPS, LITE_MINUTES, LITE_CROP = 600, 13.0, 128


# ---------------------------------------------------------------- flags
def add_model_args(parser):
    from models import METHODS
    from models.nn_index import INDEX_KINDS
    parser.add_argument("--method", default="ortho", choices=sorted(METHODS),
                        help="feature reduction / method: sample (PaDiM), h_sample, ortho (OrthoAD), svd_ortho, gaussian, "
                             "coreset (PatchCore)")
    parser.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone")
    parser.add_argument("--k", type=int, default=100, help="reduced feature dimension")
    parser.add_argument("--coreset_ratio", type=float, default=0.01,
                        help="coreset: share of the training patches kept in the memory bank")
    parser.add_argument("--num_neighbors", type=int, default=9,
                        help="coreset: bank neighbours in the image-score re-weighting (1: plain maximum)")
    parser.add_argument("--faiss", action="store_true",
                        help="coreset: nearest-neighbour search with faiss IndexFlatL2 (pip install faiss-cpu); "
                             "same as --nn_search faiss")
    parser.add_argument("--nn_search", default="grouped", choices=INDEX_KINDS,
                        help="coreset: exact nearest-neighbour search: grouped (bank grouped around its first coreset "
                             "centres, triangle-inequality pruning), brute (every distance) or faiss")
    parser.add_argument("--model_size", default="small", choices=["small", "medium"], help="efficientad: PDN size")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="efficientad: training steps (default: the paper's 70000; 60000 with --distill)")
    parser.add_argument("--train_minutes", type=float, default=None,
                        help="efficientad: time box; training stops after this many minutes (lr drop at 95%%)")
    parser.add_argument("--lite", action="store_true",
                        help=f"efficientad: CPU setting, --train_steps {LITE_STEPS} within --train_minutes {LITE_MINUTES:g} "
                             f"on --train_crop {LITE_CROP}")
    parser.add_argument("--teacher_weights", default=None,
                        help="efficientad: distilled teacher .pdparams (written there by --distill)")
    parser.add_argument("--train_crop", type=int, default=None,
                        help="efficientad: train the student on random CROPxCROP windows (multiple of 4, "
                             ">= 64) of each image; default: whole images, as the paper")
    parser.add_argument("--imagenet_dir", default=None, help="efficientad: images for the student's ImageNet penalty")
    parser.add_argument("--distill", action="store_true",
                        help="efficientad: distil a teacher PDN from --backbone_weights on --distill_data, then exit")
    parser.add_argument("--distill_data", nargs="+", default=None, metavar="DIR",
                        help="efficientad --distill: folders of natural images (searched recursively)")
    parser.add_argument("--resume", action="store_true", help="efficientad: continue from the last checkpoint")
    parser.add_argument("--checkpoint_every", type=int, default=500, help="efficientad: steps between checkpoints")
    parser.add_argument("--seed", type=int, default=521, help="seed for projections and sampling")
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    parser.add_argument("--crop_size", type=int, default=224, help="centre crop fed to the network")
    parser.add_argument("--image_size", default=None, metavar="H,W",
                        help="full frame: resize the whole image to exactly HxW (any aspect ratio, no crop; "
                             "implies --crop none) instead of --resize + --crop_size")
    parser.add_argument("--crop", default=None, choices=["center", "none"],
                        help="center: --resize shorter side, --crop_size centre square (default); "
                             "none: the whole image at --image_size (default when --image_size is given)")
    parser.add_argument("--tile", type=int, default=0,
                        help="high resolution: the network sees TILE x TILE squares of the image resized to "
                             "--image_size (the whole image, never a centre crop); the maps are stitched back")
    parser.add_argument("--tile_stride", type=int, default=None,
                        help="pixels between tiles (default --tile; smaller overlaps them, overlaps averaged)")
    parser.add_argument("--save_path", default=None, help="output folder (default output/<method>_<arch>_k<k>)")
    parser.add_argument("--model_path", default=None,
                        help="model file, or folder of <category>.pdparams (default: --save_path)")


def add_data_args(parser):
    parser.add_argument("--data_path", default=None, help="MVTec-layout root folder (default: demo_data)")
    parser.add_argument("--category", default="all",
                        help="all, objects, textures, one category or a comma list; folder mode: the "
                             "category's name (default: the parent folder of --normal_dir)")
    parser.add_argument("--normal_dir", default=None,
                        help="folder mode (instead of --data_path): a folder of good images")
    parser.add_argument("--abnormal_dir", default=None,
                        help="folder mode: rejected images, flat or one subfolder per defect type")
    parser.add_argument("--mask_dir", default=None,
                        help="folder mode: masks named <stem>.png or <stem>_mask.png, flat or per defect type")
    parser.add_argument("--normal_test_ratio", type=float, default=0.2,
                        help="folder mode: share of --normal_dir split off (seeded by --seed) as test images")
    parser.add_argument("--batch_size", type=int, default=8, help="images loaded per step")
    parser.add_argument("--num_workers", type=int, default=2, help="image-decoding threads")


def add_runtime_args(parser):
    parser.add_argument("--engine", default="inference", choices=["inference", "eager"],
                        help="run the feature network with Paddle Inference (fast, same as deployment) or eager")
    parser.add_argument("--use_gpu", type=str2bool, default=False)
    parser.add_argument("--enable_mkldnn", type=str2bool, default=True, help="oneDNN on CPU")
    parser.add_argument("--cpu_threads", type=int, default=os.cpu_count() or 1)
    add_precision_arg(parser, what="fp32 for a new fit; a fitted model's own (the one it was fitted at) otherwise")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    scaleout.add_scaleout_args(parser)


def add_eval_args(parser):
    parser.add_argument("--eval_PRO", action="store_true", help="also compute PRO (area up to FPR 0.3)")
    parser.add_argument("--non_partial_AUC", action="store_true",
                        help="AUROC with the OrthoAD reference's bin rule instead of sklearn (reads higher)")
    parser.add_argument("--save_pic", type=str2bool, default=False, help="figures per test image")


def parse(parser, argv=None):
    args = parser.parse_args(argv)
    resolve_data_args(args)
    parse_geometry(args)
    set_cpu_threads(getattr(args, "cpu_threads", None))  # statistics, scoring and BLAS follow --cpu_threads too
    if hasattr(args, "method"):
        build_method(runtime_config(method_config(args), args))  # bad method flags fail now, in one line
    if args.save_path is None:
        args.save_path = os.path.join("output", run_name(args))
    apply_method_defaults(args)
    if hasattr(args, "method"):
        check_geometry(method_config(args), getattr(args, "max_stats_gb", None))
    return args


def parse_geometry(args):
    """--image_size "H,W" -> (H, W); --crop defaults to none with --image_size or --tile, else center."""
    if getattr(args, "image_size", None) is not None:
        args.image_size = parse_image_size(args.image_size)
    if hasattr(args, "crop") and args.crop is None:
        args.crop = "none" if args.image_size is not None or args.tile else "center"
    if getattr(args, "tile_stride", None) is None and hasattr(args, "tile"):
        args.tile_stride = args.tile


def apply_method_defaults(args):
    """EfficientAD's PDN takes 256x256 images (no 224 ImageNet crop; full frames and tiles are
    checked by check_geometry) and the paper's step counts."""
    if args.method != "efficientad":
        return
    from models.efficientad import IMAGE_SIZE, PAPER_DISTILL_STEPS, PAPER_TRAIN_STEPS, check_train_crop
    args.resize = args.crop_size = IMAGE_SIZE
    if getattr(args, "lite", False):
        args.train_steps = args.train_steps or LITE_STEPS
        args.train_minutes = args.train_minutes or LITE_MINUTES
        args.train_crop = args.train_crop or LITE_CROP
    if args.train_steps is None:
        args.train_steps = PAPER_DISTILL_STEPS if getattr(args, "distill", False) else PAPER_TRAIN_STEPS
    if args.train_steps < 1:
        raise UserError(f"--train_steps must be at least 1, got {args.train_steps}")
    check_train_crop(getattr(args, "train_crop", None))


def method_config(args):
    keys = ("method", "arch", "k", "seed", "resize", "crop_size", "crop", "image_size", "tile", "tile_stride",
            "coreset_ratio", "num_neighbors", "model_size", "train_steps", "train_crop")
    cfg = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    cfg["backbone_weights"] = os.path.basename(args.backbone_weights) if getattr(args, "backbone_weights", None) else "imagenet"
    return cfg


def runtime_config(config, args):
    """The model's config plus the flags that change how it runs, not what it computes
    (never saved: a model trained with --faiss scores the same without it)."""
    search = "faiss" if getattr(args, "faiss", False) else getattr(args, "nn_search", "grouped")
    return dict(config, nn_search=search)


def engine_kwargs(args, precision="fp32"):
    """The feature engine's settings; `precision` as resolved by models/precision.py (a new fit:
    resolve(--precision), a fitted model: for_model(--precision, its config))."""
    kw = {"engine": args.engine, "precision": precision}
    if args.engine == "inference":
        kw.update(use_gpu=args.use_gpu, enable_mkldnn=args.enable_mkldnn, cpu_threads=args.cpu_threads)
    else:
        import paddle
        paddle.set_device("gpu" if args.use_gpu else "cpu")
    return kw


def model_path_for(args, category):
    base = args.model_path or args.save_path
    if base.endswith(".pdparams"):
        return base
    return os.path.join(base, f"{category}.pdparams")


def parser_with(*adders, description=None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in adders:
        add(parser)
    return parser
