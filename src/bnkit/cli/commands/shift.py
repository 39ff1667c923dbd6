"""``bnkit shift MODEL DATA``: how far DATA is from each BatchNorm's running statistics, and what to do."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bnkit.cli.commands import DATA_HELP, add_model_arguments
from bnkit.cli.io import load_data, load_model, require_eager
from bnkit.cli.output import Table, progress

NAME = "shift"
HELP = "domain-shift score of data against the running statistics"


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shift``.

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> main_parser("shift").parse_args(["shift", "m.pt", "x.npy"]).batch_size
        64
    """
    parser = subparsers.add_parser(
        NAME, help=HELP,
        description="Per BatchNorm layer, the symmetric KL divergence between its running statistics and the "
        "statistics of its input on DATA (model in eval mode, unchanged), an overall score and a "
        "recommendation: keep-frozen, recalibrate (AdaBN) or fine-tune-bn (see bnkit.inspection.shift).",
    )
    add_model_arguments(parser)
    parser.add_argument("data", metavar="DATA", help=DATA_HELP)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch for tensor data (64)")
    parser.add_argument("--num-batches", type=int, default=None, help="use at most this many batches")
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load model and data and score the shift.

    Example:
        >>> run(argparse.Namespace(model="m.pt", weights=None, data="x.npy", batch_size=64,
        ...                        num_batches=None))  # doctest: +SKIP
    """
    from bnkit.inspection.shift import shift

    model = require_eager(load_model(args.model, args.weights), NAME)
    source = load_data(args.data, batch_size=args.batch_size)
    total = source.num_batches
    if args.num_batches is not None and total is not None:
        total = min(total, args.num_batches)
    batches = progress(source.batches, total, "shift")
    return shift(model, batches, num_batches=args.num_batches).to_dict()


def render(data: dict[str, Any]) -> list[Table | str]:
    """The per-layer table and the verdict.

    Example:
        >>> render({"layers": [], "score": 0.0, "recommendation": "keep-frozen", "reason": "r", "batches": 1,
        ...         "skipped": []})[-1]
        'score 0: keep-frozen. r'
    """
    columns = ["layer", "channels", "distance", "max channel", "mean shift (sd)", "|log var ratio|"]
    rows = [[r["name"], r["channels"], r["distance"], r["max_channel_distance"], r["mean_shift"],
             r["log_var_ratio"]] for r in data["layers"]]
    notes = [f"skipped: {', '.join(data['skipped'])}"] if data.get("skipped") else []
    verdict = f"score {data['score']:.4g}: {data['recommendation']}. {data['reason']}"
    return [Table(None, columns, rows, notes), verdict]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit shift`` alone.

    Example:
        >>> main(["m.pt", "x.npy"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
