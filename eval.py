"""Evaluate saved models on the test set: image AUROC, pixel AUROC, PRO, thresholds, pictures.

    python eval.py --data_path demo_data --category bottle --method ortho --arch resnet18 --k 100 --eval_PRO
    python eval.py ... --report                    # <save_path>/report/index.html
    python eval.py --normal_dir PATH/good --abnormal_dir PATH/reject --category cap   # the model's own split
    python eval.py --compare RUN_DIR RUN_DIR [...] [--save_path OUT]
"""
from pipeline import cli, engine, evaluation
import report
from utils import run_cli, str2bool


def main(argv=None):
    parser = cli.parser_with(cli.add_model_args, cli.add_data_args, cli.add_runtime_args,
                                cli.add_eval_args, report.add_report_args, description=__doc__)
    parser.add_argument("--update_thresholds", type=str2bool, default=True,
                        help="store the F1-optimal thresholds found on the test set in the model file")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="compare finished runs (their results.csv) into comparison.md/.csv/.html "
                             "in --save_path (default: the current folder); nothing is evaluated")
    args = parser.parse_args(argv)
    if args.compare:  # before cli.parse, which would fill in a run's --save_path
        return report.compare_runs(args.compare, args.save_path or ".")
    args = cli.parse(parser, argv)
    args.eval_PRO = args.eval_PRO or args.report
    return engine.run_categories(args, evaluation.eval_category, "eval")


if __name__ == "__main__":
    run_cli(main)
