"""``bnkit doctor MODEL``: find BatchNorm mistakes and say how to fix them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bnkit.cli.commands import (
    DATA_HELP,
    add_input_size,
    add_model_arguments,
    example_from_size,
    first_batch,
    parse_size,
)
from bnkit.cli.io import CliError, load_data, load_model, require_eager
from bnkit.cli.output import Result, Table

NAME = "doctor"
HELP = "find BatchNorm mistakes (ported momentum, frozen-stats traps, ...)"
_LEVELS = {"never": -1, "error": 0, "warning": 1, "info": 2}


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``doctor``.

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> main_parser("doctor").parse_args(["doctor", "m.pt", "--intent", "inference"]).intent
        'inference'
    """
    parser = subparsers.add_parser(
        NAME, help=HELP,
        description="Check every BatchNorm layer against the rules BN001-BN011 (bnkit.doctor). An example batch "
        "(--data, or --input-size with --batch-size) enables the batch-size and call-count rules.",
    )
    add_model_arguments(parser)
    parser.add_argument("--intent", choices=["inference", "training", "fine-tune"], default=None,
                        help="what the model is for (default: its training flag decides)")
    add_input_size(parser, "example input shape without the batch dimension (random normal example batch)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-device batch size of the example (default 8 with --input-size; --data: as saved)")
    parser.add_argument("--data", default=None, help="take the example batch from data: " + DATA_HELP)
    parser.add_argument("--fail-on", choices=list(_LEVELS), default="never",
                        help="exit with status 1 when a finding is at least this severe (default never)")
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace) -> Result:
    """Load the model, build the example batch and run the rules; exit 1 per ``--fail-on``.

    Example:
        >>> ns = argparse.Namespace(model="torch.nn:Identity", weights=None, intent=None, input_size=None,
        ...                         batch_size=None, data=None, fail_on="never")
        >>> run(ns).data
        []
    """
    from bnkit.inspection.doctor import SEVERITIES, doctor

    model = require_eager(load_model(args.model, args.weights), NAME)
    example = None
    if args.data is not None and args.input_size is not None:
        raise CliError("give either --data or --input-size for the example batch, not both")
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.data is not None:
        batch = first_batch(load_data(args.data, batch_size=args.batch_size or 10**9).batches)
        example = batch[0] if isinstance(batch, (tuple, list)) else batch
    elif args.input_size is not None:
        example = example_from_size(model, parse_size(args.input_size), args.batch_size or 8)
    findings = doctor(model, example, intent=args.intent)
    worst = findings.worst()
    threshold = _LEVELS[args.fail_on]
    failed = worst is not None and SEVERITIES.index(worst) <= threshold
    return Result(findings.to_dicts(), exit_code=1 if failed else 0)


def render(data: list[dict[str, Any]]) -> list[Table | str]:
    """A table of findings, or a line saying there is none.

    Example:
        >>> render([])
        ['no problems found']
    """
    if not data:
        return ["no problems found"]
    rows = [[f["code"], f["severity"], f["layer"] or "(model)", f["message"], f["fix"]] for f in data]
    counts = {s: sum(f["severity"] == s for f in data) for s in ("error", "warning", "info")}
    summary_line = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    return [Table(None, ["code", "severity", "layer", "problem", "fix"], rows), summary_line]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit doctor`` alone.

    Example:
        >>> main(["torch.nn:Identity"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
