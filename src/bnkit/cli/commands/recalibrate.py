"""``bnkit recalibrate MODEL DATA -o OUT``: recompute running statistics from data (precise BN, AdaBN)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnkit.cli.commands import DATA_HELP, add_model_arguments
from bnkit.cli.commands._save import add_output_arguments, check_output, write_model
from bnkit.cli.io import is_factory_spec, load_data, load_model, require_eager
from bnkit.cli.output import Table

NAME = "recalibrate"
HELP = "recompute running statistics from data (precise BN, AdaBN)"


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``recalibrate``.

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> main_parser("recalibrate").parse_args(["recalibrate", "m.pt", "x.npy", "-o", "r.pt"]).method
        'precise'
    """
    parser = subparsers.add_parser(
        NAME, help=HELP,
        description="Recompute the running statistics of every BatchNorm layer from DATA (bnkit.recalibrate) "
        "and write the model to OUT. On target-domain data this is AdaBN. The input file is never changed.",
    )
    add_model_arguments(parser)
    parser.add_argument("data", metavar="DATA", help=DATA_HELP)
    add_output_arguments(parser, auto="state_dict for a factory model (load it with --weights), module otherwise")
    parser.add_argument("--method", choices=["precise", "ema"], default="precise",
                        help="precise: exact population statistics (default); ema: momentum updates")
    parser.add_argument("--sequential", action="store_true",
                        help="recompute layer by layer (one pass over DATA per layer)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch for tensor data (64)")
    parser.add_argument("--num-batches", type=int, default=None, help="use at most this many batches")
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Recalibrate and write; returns the recalibration report with the output path.

    Example:
        >>> run(argparse.Namespace(model="m.pt", weights=None, data="x.npy", output="r.pt", format="auto",
        ...     method="precise", sequential=False, batch_size=64, num_batches=None))  # doctest: +SKIP
    """
    from dataclasses import asdict

    from bnkit.tools.recalibrate import recalibrate

    loaded = load_model(args.model, args.weights)
    model = require_eager(loaded, NAME)
    data_inputs = [] if is_factory_spec(args.data) else [Path(args.data)]
    check_output(loaded, args, data_inputs)
    source = load_data(args.data, batch_size=args.batch_size)
    report = recalibrate(
        model, source.batches, method=args.method, num_batches=args.num_batches, progress=sys.stderr.isatty(),
        sequential=args.sequential,
    )
    auto = "state_dict" if loaded.kind == "factory" else "module"
    written = write_model(model, loaded, args, auto=auto, extra_inputs=data_inputs)
    return {**written, **asdict(report)}


def render(data: dict[str, Any]) -> list[Table | str]:
    """Per-layer counts and the file written.

    Example:
        >>> render({"counts": {"bn": 6}, "skipped": {}, "method": "precise", "batches": 2, "passes": 1,
        ...         "output": "r.pt", "format": "module"})[-1]
        'wrote r.pt (module): 1 layers recalibrated (precise) from 2 batches in 1 pass(es)'
    """
    count_label = "values per channel" if data["method"] == "precise" else "updates"
    blocks: list[Table | str] = [Table(None, ["layer", count_label], [[k, v] for k, v in data["counts"].items()])]
    if data["skipped"]:
        blocks.append(Table("skipped", ["layer", "why"], [[k, v] for k, v in data["skipped"].items()]))
    blocks.append(
        f"wrote {data['output']} ({data['format']}): {len(data['counts'])} layers recalibrated ({data['method']}) "
        f"from {data['batches']} batches in {data['passes']} pass(es)"
    )
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit recalibrate`` alone.

    Example:
        >>> main(["m.pt", "x.npy", "-o", "r.pt"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
