"""Predict with a trained model (eager/Paddle-Inference feature path, shared post-processing).

    python predict.py IMAGE_OR_FOLDER --category bottle --method ortho --arch resnet18 --k 100 --save_pic True
    python predict.py LINE_FOLDER --category bottle --report     # + review page <output_dir>/report/index.html

Prints one JSON line per image (pred_score, pred_label, file paths) and writes the anomaly map
(.npy, calibrated: the threshold is 0.5), the predicted mask (.png) and, with --save_pic, an overlay.
A file that cannot be read is named on one line and skipped; the exit code is then 3.
"""
import os

from pipeline import cli, evaluation
from datasets.transforms import list_input_images
from datasets.unreadable import UnreadableImages
from report import add_review_args
from utils import run_cli, str2bool


def main(argv=None):
    parser = cli.parser_with(cli.add_model_args, cli.add_runtime_args, description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--category", default=None, help="which <category>.pdparams to use")
    parser.add_argument("--output_dir", default=None, help="default <save_path>/predictions/<category>")
    parser.add_argument("--save_pic", type=str2bool, default=False, help="also write an overlay figure")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs of the same images")
    add_review_args(parser, "<output_dir>")
    args = cli.parse(parser, argv)
    paths = list_input_images(args.inputs)
    if args.output_dir is None:
        args.output_dir = os.path.join(args.save_path, "predictions", args.category or "")
    unreadable = UnreadableImages()
    evaluation.predict_images(args, paths, unreadable)
    return unreadable.exit_code(len(paths))


if __name__ == "__main__":
    run_cli(main)
