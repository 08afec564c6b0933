"""Names both the evaluation (engine.py) and the report package need: the columns of a run's
results.csv and the default name of its folder. They live below both so neither imports the other."""

RESULT_HEADER = ["category", "image_AUROC", "pixel_AUROC", "PRO"]


def run_name(args):
    """Default output folder name: the method's defining flags, plus the input geometry when it
    is not the default centre crop, so a full-frame or tiled run never lands in (and replaces
    the models of) the centre-crop run's folder."""
    if args.method == "coreset":
        name = f"coreset_{args.arch}_r{args.coreset_ratio:g}"
    elif args.method == "efficientad":
        name = f"efficientad_{args.model_size}"
    else:
        name = f"{args.method}_{args.arch}_k{args.k}"
    return name + geometry_suffix(args)


def geometry_suffix(args):
    """'' for the centre crop; '_HxW' for a full frame; '_HxW_tT' (and 'sS' for a stride) when tiled."""
    size = getattr(args, "image_size", None)
    if getattr(args, "crop", "center") != "none" or not size:
        return ""
    suffix = f"_{size[0]}x{size[1]}"
    tile = getattr(args, "tile", 0)
    if tile:
        suffix += f"_t{tile}" + (f"s{args.tile_stride}" if args.tile_stride not in (None, tile) else "")
    return suffix
