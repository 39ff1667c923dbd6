"""``bnkit doctor MODEL``: find BatchNorm mistakes and say how to fix them."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import (
    DATA_HELP,
    add_input_size,
    add_model_arguments,
    command_main,
    example_batch,
    first_batch,
    load_eager,
    positive_int,
)
from bnkit.cli.io import CliError, load_data
from bnkit.cli.output import Result, Table

NAME = "doctor"
DESCRIPTION = (
    "Check every BatchNorm layer against the rules BN001-BN011 (bnkit.doctor). An example batch "
    "(--data, or --input-size with --batch-size) enables the batch-size and call-count rules."
)
_LEVELS = {"never": -1, "error": 0, "warning": 1, "info": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bnkit doctor``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["m.pt", "--intent", "inference"]).intent
        'inference'
    """
    add_model_arguments(parser)
    parser.add_argument(
        "--intent",
        choices=["inference", "training", "fine-tune"],
        default=None,
        help="what the model is for (default: its training flag decides)",
    )
    add_input_size(parser, "example input shape without the batch dimension (random normal example batch)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="per-device batch size of the example (default 8 with --input-size; --data: as saved)",
    )
    parser.add_argument("--data", default=None, help="take the example batch from data: " + DATA_HELP)
    parser.add_argument(
        "--fail-on",
        choices=list(_LEVELS),
        default="never",
        help="exit with status 1 when a finding is at least this severe (default never)",
    )


def run(args: argparse.Namespace) -> Result:
    """Load the model, build the example batch and run the rules; exit 1 per ``--fail-on``.

    Example:
        >>> ns = argparse.Namespace(model="torch.nn:Identity", weights=None, intent=None, input_size=None,
        ...                         batch_size=None, data=None, fail_on="never")
        >>> run(ns).data
        []
    """
    from bnkit.inspection.doctor import SEVERITIES, doctor

    _, model = load_eager(args, NAME)
    if args.data is not None and args.input_size is not None:
        raise CliError("give either --data or --input-size for the example batch, not both")
    if args.data is not None:
        batch = first_batch(load_data(args.data, batch_size=args.batch_size or 10**9).batches)
        example = batch[0] if isinstance(batch, (tuple, list)) else batch
    else:
        example = example_batch(model, args.input_size, args.batch_size or 8)
    findings = doctor(model, example, intent=args.intent)
    worst = findings.worst()
    failed = worst is not None and SEVERITIES.index(worst) <= _LEVELS[args.fail_on]
    return Result(findings.to_dicts(), exit_code=1 if failed else 0)


def render(data: list[dict[str, Any]]) -> list[Table | str]:
    """The library's table of findings and a count per severity, or a line saying there is none.

    Example:
        >>> render([])
        ['no problems found']
    """
    from bnkit.inspection.doctor import SEVERITIES, Diagnosis, Finding

    findings = Diagnosis(Finding(**f) for f in data)
    if not findings:
        return [findings.empty]
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    summary_line = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    return [Table(None, findings.columns, findings.rows()), summary_line]


main = command_main(NAME)
