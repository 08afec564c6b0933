"""Fit an anomaly detector per category on good images; optionally evaluate it.

    python train.py --data_path demo_data --category all --method ortho --arch resnet18 --k 100 \
        --backbone_weights weights.pdparams --eval --eval_PRO [--report]
    python train.py --normal_dir PATH/good --abnormal_dir PATH/reject [--mask_dir PATH/masks] --category cap --eval
    python train.py --update --from_review review.json --model_path MODEL    # add the images marked good
"""
from pipeline import cli, engine, training
import report
from pipeline import updating
from utils import run_cli


def main(argv=None):
    parser = cli.parser_with(cli.add_model_args, cli.add_data_args, cli.add_runtime_args,
                                cli.add_eval_args, report.add_report_args, description=__doc__)
    parser.add_argument("--backbone_weights", default=None,
                        help="local ImageNet .pdparams for the backbone (default: the bundled weights for resnet18, "
                             "else download the official ones)")
    parser.add_argument("--eval", action="store_true", help="evaluate on the test set after fitting")
    parser.add_argument("--calib_ratio", type=float, default=0.1,
                        help="without --eval: share of train/good held out to calibrate thresholds")
    parser.add_argument("--max_stats_gb", type=float, default=4.0,
                        help="PaDiM/OrthoAD: refuse, before the fit, statistics that need more memory (they grow "
                             "with --image_size and with the number of tiles)")
    parser.add_argument("--keep_sums", action="store_true",
                        help="PaDiM/OrthoAD: save the float64 sums beside the model (<category>.sums.npz), "
                             "for --update")
    parser.add_argument("--update", action="store_true",
                        help="PaDiM/OrthoAD: add the training images under --data_path to the model at "
                             "--model_path (fitted with --keep_sums) instead of fitting a new one")
    parser.add_argument("--from_review", default=None, metavar="REVIEW_JSON",
                        help="with --update: add the images marked good in this review.json (downloaded from a "
                             "report page of predict.py/infer.py/eval.py --report) instead of --data_path's")
    parser.add_argument("--force", action="store_true",
                        help="with --from_review: accept a review made against another version of the model")
    args = cli.parse(parser, argv)
    updating.check_update_args(args)
    training.resolve_precision(args)
    args.eval_PRO = args.eval_PRO or args.report
    args.eval = args.eval or args.eval_PRO or args.save_pic
    if args.distill:
        return training.distill_teacher(args)
    work = updating.update_category if args.update else training.train_category
    categories = updating.review_categories(args) if args.review else None
    return engine.run_categories(args, work, "train", categories)


if __name__ == "__main__":
    run_cli(main)
