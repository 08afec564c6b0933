"""Names both the evaluation (engine.py) and the report package need: the columns of a run's
results.csv and the default name of its folder. They live below both so neither imports the other."""

RESULT_HEADER = ["category", "image_AUROC", "pixel_AUROC", "PRO"]


def run_name(args):
    """Default output folder name: the method's defining flags. The input geometry is left out on
    purpose: eval.py, predict.py and export_model.py find a full-frame or tiled model with the
    method flags alone (the model file carries its geometry)."""
    if args.method == "coreset":
        return f"coreset_{args.arch}_r{args.coreset_ratio:g}"
    if args.method == "efficientad":
        return f"efficientad_{args.model_size}"
    return f"{args.method}_{args.arch}_k{args.k}"
