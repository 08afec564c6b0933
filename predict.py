"""Predict with a trained model (eager/Paddle-Inference feature path, shared post-processing).

    python predict.py IMAGE_OR_FOLDER --category bottle --method ortho --arch resnet18 --k 100 --save_pic True

Prints one JSON line per image (pred_score, pred_label, file paths) and writes the anomaly map
(.npy, calibrated: the threshold is 0.5), the predicted mask (.png) and, with --save_pic, an overlay.
"""
import os

import engine
from datasets.transforms import list_input_images
from utils import run_cli


def main(argv=None):
    parser = engine.parser_with(engine.add_model_args, engine.add_runtime_args, description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--category", default=None, help="which <category>.pdparams to use")
    parser.add_argument("--output_dir", default=None, help="default <save_path>/predictions/<category>")
    parser.add_argument("--save_pic", type=engine.str2bool, default=False, help="also write an overlay figure")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs of the same images")
    args = engine.parse(parser, argv)
    paths = list_input_images(args.inputs)
    if args.output_dir is None:
        args.output_dir = os.path.join(args.save_path, "predictions", args.category or "")
    engine.predict_images(args, paths)
    return 0


if __name__ == "__main__":
    run_cli(main)
