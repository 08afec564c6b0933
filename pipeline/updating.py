"""train.py --update: add good images to a fitted PaDiM/OrthoAD model without refitting the old
ones. The model's saved float64 sums (--keep_sums) plus those of the new images give the model a
fit on all of them would give (mean and precision within float64 rounding)."""
from datasets import open_dataset
from datasets.transforms import Preprocess
from models import build_method, check_model_matches, load_model, save_model
from models.padim_sums import load_sums, save_sums
from utils import UserError
from pipeline import cli, evaluation, scaleout, training


def check_keep_sums(args):
    from models.padim import PROJECTIONS
    if (args.keep_sums or args.update) and args.method not in PROJECTIONS:
        raise UserError(f"--keep_sums and --update are for the PaDiM/OrthoAD methods ({', '.join(PROJECTIONS)}), "
                        f"not --method {args.method}")


def update_category(args, category):
    """Add the training images of `category` under --data_path to the model at --model_path."""
    if scaleout.split_group() is not None:
        raise UserError("--update runs in one process (it reads only the new images)")
    path = cli.model_path_for(args, category)
    state = load_model(path)
    check_model_matches(state, cli.method_config(args), path)
    method = build_method(cli.runtime_config(state["config"], args))
    if not hasattr(method, "update"):
        raise UserError(f"{path} is a {state['config']['method']} model; --update adds images to PaDiM/OrthoAD models")
    if state["config"]["method"] == "svd_ortho":
        raise UserError(f"{path} is an svd_ortho model, whose projection is fitted to its training images: "
                        f"new images would change it; fit again on all images")
    sums = load_sums(path, state)
    if getattr(args, "normal_dir", None):  # folder mode: every new good image is a training image
        if args.eval:
            raise UserError("--update --eval in folder mode: the new folder has no test split; evaluate the updated "
                            "model with eval.py on its original folders")
        args.normal_test_ratio = 0.0
    samples = open_dataset(args).train_samples(category)
    preprocess = Preprocess.from_config(state["config"])
    stats, sums, feature_engine = method.update(state, sums, training.image_batches(samples, args, preprocess),
                                                cli.engine_kwargs(args), progress=not args.no_progress)
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
    print(f"  {path}: {len(samples)} images added, {sums['count']} in all")
    return evaluation.with_version(result, state)
