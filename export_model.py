"""Export a trained model for deployment: static feature graph + one stats file (+ ONNX).

    python export_model.py --method ortho --arch resnet18 --k 100 \
        --model_path output/ortho_resnet18_k100/bottle.pdparams --save_dir inference/bottle
"""
import os

from pipeline import cli
from deploy.export import export_model
from utils import UserError, add_precision_arg, run_cli


def main(argv=None):
    parser = cli.parser_with(cli.add_model_args, description=__doc__)
    parser.add_argument("--category", default=None, help="with --save_path: exports <save_path>/<category>.pdparams")
    parser.add_argument("--save_dir", default=None, help="output folder (default inference/<category>)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx with paddle2onnx")
    add_precision_arg(parser, what="the model's own; infer.py and serve.py run the export at it")
    args = cli.parse(parser, argv)
    if not args.model_path and not args.category:
        raise UserError("give --model_path <category>.pdparams, or --category with --save_path")
    model_path = cli.model_path_for(args, args.category) if args.category else args.model_path
    if not model_path.endswith(".pdparams"):
        raise UserError(f"--model_path must be a <category>.pdparams file, got {model_path}")
    save_dir = args.save_dir or os.path.join("inference", args.category or os.path.basename(model_path)[:-9])
    files = export_model(model_path, save_dir, onnx=args.onnx, expect=cli.method_config(args),
                         precision=args.precision)
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
