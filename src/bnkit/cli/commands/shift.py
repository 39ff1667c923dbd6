"""``bnkit shift MODEL DATA``: how far DATA is from each BatchNorm's running statistics, and what to do."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import add_data_arguments, add_model_arguments, command_main, load_eager
from bnkit.cli.io import load_data
from bnkit.cli.output import Table, progress

NAME = "shift"
DESCRIPTION = (
    "Per BatchNorm layer, the symmetric KL divergence between its running statistics and the "
    "statistics of its input on DATA (model in eval mode, unchanged), an overall score and a "
    "recommendation: keep-frozen, recalibrate (AdaBN) or fine-tune-bn (see bnkit.inspection.shift)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit shift``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "x.npy"]).batch_size
        64
    """
    add_model_arguments(parser)
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load model and data and score the shift.

    Example:
        >>> run(argparse.Namespace(model="m.pt", weights=None, data="x.npy", batch_size=64,
        ...                        num_batches=None))  # doctest: +SKIP
    """
    from bnkit.inspection.shift import shift

    _, model = load_eager(args, NAME)
    source = load_data(args.data, batch_size=args.batch_size)
    total = source.num_batches
    if args.num_batches is not None and total is not None:
        total = min(total, args.num_batches)
    batches = progress(source.batches, total, "shift")
    return shift(model, batches, num_batches=args.num_batches).to_dict()


def render(data: dict[str, Any]) -> list[Table | str]:
    """The library's per-layer table, the layers skipped, and the verdict.

    Example:
        >>> render({"layers": [], "score": 0.0, "recommendation": "keep-frozen", "reason": "r", "batches": 1,
        ...         "skipped": []})[-1]
        'score 0: keep-frozen. r'
    """
    from bnkit.inspection.shift import ShiftReport

    report = ShiftReport.from_dict(data)
    notes = [f"skipped: {', '.join(report.skipped)}"] if report.skipped else []
    return [Table(None, report.columns, report.rows(), notes), report.verdict()]


main = command_main(NAME)
