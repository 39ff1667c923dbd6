"""``bnkit doctor MODEL``: find BatchNorm mistakes and say how to fix them (PyTorch and Keras models)."""

from __future__ import annotations

import argparse
from typing import Any

from bnkit.cli.commands import (
    DATA_HELP,
    add_backend,
    add_input_size,
    add_model_arguments,
    command_main,
    example_batch,
    first_batch,
    keras_model_given,
    load_eager,
    parse_size,
    positive_int,
)
from bnkit.cli.files import CliError
from bnkit.cli.output import Result, Table, note_line

NAME = "doctor"
DESCRIPTION = (
    "Check every BatchNorm layer against the rules BN001-BN011 (bnkit.doctor; for a Keras model NAME.keras, "
    "KBN001-KBN010 of bnkit.keras.doctor). An example batch (--data, or --input-size with --batch-size) enables "
    "the batch-size and call-count rules. With --intent inference a PyTorch model left in train mode (as "
    "factories return it) is put in eval mode first, and a note on stderr says so."
)
_LEVELS = {"never": -1, "error": 0, "warning": 1, "info": 2}
EVAL_NOTE = (
    "the model was in train mode (as a factory returns it, or as it was saved); --intent inference checks it "
    "as it will predict, after model.eval()"
)


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
        help="what the model is for (default: its training flag decides); inference puts a train-mode PyTorch "
        "model in eval mode first",
    )
    add_input_size(
        parser,
        "example input shape without the batch dimension, e.g. 3,32,32 or 3 32 32 (random normal example batch; "
        "channels last for Keras models, e.g. 32,32,3)",
    )
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
    add_backend(parser)


def run(args: argparse.Namespace) -> Result:
    """Load the model, build the example batch and run the rules; exit 1 per ``--fail-on``.

    Example:
        >>> ns = argparse.Namespace(model="torch.nn:Identity", weights=None, intent=None, input_size=None,
        ...                         batch_size=None, data=None, fail_on="never")
        >>> run(ns).data
        []
    """
    from bnkit.shared.diagnosis import SEVERITIES

    if args.data is not None and args.input_size is not None:
        raise CliError("give either --data or --input-size for the example batch, not both")
    findings = _keras_findings(args) if keras_model_given(args) else _torch_findings(args)
    worst = findings.worst()
    failed = worst is not None and SEVERITIES.index(worst) <= _LEVELS[args.fail_on]
    return Result(findings.to_dicts(), exit_code=1 if failed else 0)


def _torch_findings(args: argparse.Namespace) -> Any:
    from bnkit.cli.io import load_data
    from bnkit.inspection.doctor import doctor

    _, model = load_eager(args, NAME)
    if args.intent == "inference" and any(module.training for module in model.modules()):
        model.eval()  # a fresh model's mode is an accident of how it was made; inference runs in eval mode
        note_line(f"bnkit {NAME}", EVAL_NOTE)
    if args.data is not None:
        batch = first_batch(load_data(args.data, batch_size=args.batch_size or 10**9).batches)
        example = batch[0] if isinstance(batch, (tuple, list)) else batch
    else:
        example = example_batch(model, args.input_size, args.batch_size or 8)
    return doctor(model, example, intent=args.intent)


def _keras_findings(args: argparse.Namespace) -> Any:
    from bnkit.cli.keras_io import load_keras_data, load_keras_model
    from bnkit.keras.diagnosis import doctor as keras_doctor

    loaded = load_keras_model(args.model, trust_pickle=args.trust_pickle, backend=args.backend)
    example = None
    if args.data is not None:
        example = load_keras_data(args.data).first_batch(args.batch_size)
    elif args.input_size is not None:
        import numpy as np

        size = parse_size(args.input_size)
        example = np.random.default_rng(0).standard_normal((args.batch_size or 8, *size)).astype("float32")
    return keras_doctor(loaded.model, example, intent=args.intent)


def render(data: list[dict[str, Any]]) -> list[Table | str]:
    """The library's table of findings and a count per severity, or a line saying there is none.

    Example:
        >>> render([])
        ['no problems found']
    """
    from bnkit.shared.diagnosis import SEVERITIES, Diagnosis, Finding

    findings = Diagnosis(Finding(**f) for f in data)
    if not findings:
        return [findings.empty]
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    summary_line = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    return [Table(None, findings.columns, findings.rows()), summary_line]


main = command_main(NAME)
