"""train.py --update: add good images to a fitted PaDiM/OrthoAD model without refitting the old
ones. The model's saved float64 sums (--keep_sums) plus those of the new images give the model a
fit on all of them would give (mean and precision within float64 rounding).

The new images are the training images under --data_path, or, with --from_review, the images a
reviewer marked good on a report page (review.json: report/review.py)."""
import os

from datasets import Sample, open_dataset
from datasets.transforms import Preprocess
from models import build_method, check_model_matches, load_model, precision, save_model
from models.padim_sums import load_sums, save_sums
from models.version import version_of
from report.review import read_review, resolve_path
from utils import UserError
from pipeline import cli, evaluation, scaleout, training

# Why PatchCore has no --update: its bank is a greedy pick among every training patch, which an
# exact update would have to see again.
PATCHCORE_NO_UPDATE = ("a PatchCore memory bank is a greedy coreset of all training patches and the patches it "
                       "left out are not kept, so no update equals a fit on the union: fit again on the old and "
                       "new images together")
SHOWN_MISSING = 3  # missing images named in the error; the rest are counted


def check_update_args(args):
    """The flags of --update, --keep_sums and --from_review against each other, before any work;
    a review file is read (and checked) now."""
    from models.padim import PROJECTIONS
    if getattr(args, "from_review", None) and not args.update:
        raise UserError("--from_review goes with --update: train.py --update --from_review review.json "
                        "--model_path MODEL")
    if args.force and not getattr(args, "from_review", None):
        raise UserError("--force goes with --from_review (it accepts a review made against another model version)")
    if (args.keep_sums or args.update) and args.method == "coreset":
        raise UserError(f"--keep_sums and --update are for the PaDiM/OrthoAD methods: {PATCHCORE_NO_UPDATE}")
    if (args.keep_sums or args.update) and args.method not in PROJECTIONS:
        raise UserError(f"--keep_sums and --update are for the PaDiM/OrthoAD methods ({', '.join(PROJECTIONS)}), "
                        f"not --method {args.method}")
    args.review = read_review(args.from_review) if getattr(args, "from_review", None) else None


def review_categories(args):
    """The categories whose models --from_review updates: those with images marked good, or the
    ones --category names (each must have some)."""
    good = [image["category"] for image in args.review["images"] if image["mark"] == "good"]
    if not good:
        raise UserError(f"{args.from_review} marks no image good ({len(args.review['images'])} marked defect): "
                        f"nothing to add")
    found = list(dict.fromkeys(good))
    if args.category != "all":
        wanted = [c.strip() for c in args.category.split(",") if c.strip()]
        missing = [c for c in wanted if c not in found]
        if missing:
            raise UserError(f"{args.from_review} marks no image of category {missing[0]} good "
                            f"(its images marked good are of: {', '.join(found)})")
        found = wanted
    if len(found) > 1 and (args.model_path or "").endswith(".pdparams"):
        raise UserError(f"--model_path {args.model_path} is one model, but {args.from_review} marks images of "
                        f"{', '.join(found)} good: pass --category")
    return found


def review_samples(args, category, state, path):
    """The images of `category` marked good in the review, as training samples, in path order (so
    that the order marks were set in does not change the model). Refused: a review of another model
    version (unless --force), and images that no longer exist (named; nothing is added)."""
    review, source = args.review, args.from_review
    mine = [image for image in review["images"] if image["category"] == category]
    current = version_of(state)["id"]
    reviewed = sorted({str(image.get("model_version") or review.get("model_version")) for image in mine} - {current})
    if reviewed and not args.force:
        raise UserError(f"{source} was made against model version {', '.join(reviewed)}, but {path} is version "
                        f"{current}: its marks judge another model's answers; review the current model, or pass "
                        f"--force to add its images anyway")
    good = sorted(dict.fromkeys(resolve_path(review, image, args.data_path) for image in mine
                                if image["mark"] == "good"))
    missing = [p for p in good if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        where = " (paths relative to --data_path)" if review.get("paths_relative_to") == "data_path" else ""
        raise UserError(f"{len(missing)} of the {len(good)} images marked good in {source} no longer exist{where}: "
                        f"{', '.join(missing[:SHOWN_MISSING])}{more}; nothing was added")
    defects = sum(image["mark"] == "defect" for image in mine)
    if reviewed:
        print(f"  --force: {source} was made against version {', '.join(reviewed)}, the model is {current}")
    if defects:
        print(f"  {defects} images marked defect left out (--update adds normal images)")
    return [Sample(p, "good", 0) for p in good]


def update_category(args, category):
    """Add the training images of `category` under --data_path (or the images marked good in
    --from_review) to the model at --model_path."""
    if scaleout.split_group() is not None:
        raise UserError("--update runs in one process (it reads only the new images)")
    path = cli.model_path_for(args, category)
    state = load_model(path)
    if state["config"]["method"] == "coreset":  # before the flags are compared: this is the reason
        raise UserError(f"{path} is a PatchCore model: {PATCHCORE_NO_UPDATE}")
    check_model_matches(state, cli.method_config(args), path)
    method = build_method(cli.runtime_config(state["config"], args))
    if not hasattr(method, "update"):
        raise UserError(f"{path} is a {state['config']['method']} model; --update adds images to PaDiM/OrthoAD models")
    if state["config"]["method"] == "svd_ortho":
        raise UserError(f"{path} is an svd_ortho model, whose projection is fitted to its training images: "
                        f"new images would change it; fit again on all images")
    own = precision.recorded(state["config"])
    if args.precision not in (None, own):
        raise UserError(f"{path} was fitted at {own}: an update adds features at that precision, "
                        f"not --precision {args.precision}")
    sums = load_sums(path, state)
    if getattr(args, "review", None):
        samples = review_samples(args, category, state, path)
    else:
        if getattr(args, "normal_dir", None):  # folder mode: every new good image is a training image
            if args.eval:
                raise UserError("--update --eval in folder mode: the new folder has no test split; evaluate the "
                                "updated model with eval.py on its original folders")
            args.normal_test_ratio = 0.0
        samples = open_dataset(args).train_samples(category)
    preprocess = Preprocess.from_config(state["config"])
    engine_kwargs = cli.engine_kwargs(args, precision.for_model(None, state["config"], args.use_gpu))
    stats, sums, feature_engine = method.update(state, sums, training.image_batches(samples, args, preprocess),
                                                engine_kwargs, progress=not args.no_progress)
    state["stats"], state["train_images"] = stats, sums["count"]
    result = {"category": category}
    if args.eval:
        result = evaluation.evaluate_category(args, category, evaluation.detector_for(state, feature_engine, method),
                                          preprocess)
        state["calibration"] = result["calibration"]
    elif state.get("calibration"):
        print("  the stored thresholds are the old model's: run eval.py to calibrate the updated one")
    result["config"] = state["config"]
    save_sums(path, sums, state["config"])  # before the model: an update never reads sums older than it
    save_model(path, state)
    print(f"  {path}: {len(samples)} images added, {sums['count']} in all; version {state['version']['id']} "
          f"(from {state['version']['parent']})")
    return evaluation.with_version(result, state)
