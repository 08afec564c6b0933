"""Evaluate saved models on the test set: image AUROC, pixel AUROC, PRO, thresholds, pictures.

    python eval.py --data_path demo_data --category bottle --method ortho --arch resnet18 --k 100 --eval_PRO
"""
import engine
from utils import run_cli, str2bool


def main(argv=None):
    parser = engine.parser_with(engine.add_model_args, engine.add_data_args, engine.add_runtime_args,
                                engine.add_eval_args, description=__doc__)
    parser.add_argument("--update_thresholds", type=str2bool, default=True,
                        help="store the F1-optimal thresholds found on the test set in the model file")
    args = engine.parse(parser, argv)
    return engine.run_categories(args, engine.eval_category, "eval")


if __name__ == "__main__":
    run_cli(main)
