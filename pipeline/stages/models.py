"""List the model registry: family, parameters, GFLOPs, options.

Prints every model name seg_models.build_model accepts, with its family, parameter count, GFLOPs at
--size x --size and the options it takes (upsample, atrous_rates, ...).
"""

from __future__ import annotations

NEEDS_PARAMS = False


def add_arguments(parser) -> None:
    parser.add_argument("--size", type=int, default=520, help="input side for the GFLOPs column (default 520)")


def run(_params, args) -> int:
    from pipeline.errors import UserError

    if args.size < 32:
        raise UserError(f"--size must be >= 32, got {args.size}")
    from seg_models.summary import format_table, model_table

    print(format_table(model_table(size=args.size)))
    return 0
