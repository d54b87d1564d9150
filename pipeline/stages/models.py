"""List the model registry: family, parameters, GFLOPs, options.

Prints every model name seg_models.build_model accepts, with its family, parameter count, GFLOPs at
--size x --size and the options it takes (upsample, atrous_rates, ...). With --crop N it then shows,
for every DeepLabV3 model (default options, each output stride it takes), the side of the feature map
its ASPP sees at an N x N crop and each atrous branch's field of view, (2 rate + 1) x output stride
pixels, marking the branches whose rate reaches the feature-map side (= 1x1 conv at this crop).
"""

from __future__ import annotations

NEEDS_PARAMS = False


def add_arguments(parser) -> None:
    parser.add_argument("--size", type=int, default=520, help="input side for the GFLOPs column (default 520)")
    parser.add_argument("--crop", type=int, default=None, metavar="N",
                        help="also show what each DeepLabV3 ASPP sees at an N x N crop (e.g. train.crop_size)")


def run(_params, args) -> int:
    from pipeline.errors import UserError

    if args.size < 32:
        raise UserError(f"--size must be >= 32, got {args.size}")
    if args.crop is not None and args.crop < 1:
        raise UserError(f"--crop must be >= 1, got {args.crop}")
    from seg_models.summary import aspp_lines, format_table, model_table

    print(format_table(model_table(size=args.size)))
    if args.crop is not None:
        print("\n" + "\n".join(aspp_lines(args.crop)))
    return 0
