"""``bnkit study``: should I freeze BatchNorm when fine-tuning? The measured answer, rerunnable in minutes.

Without a model it runs the bundled experiment (scikit-learn digits with domain shifts; see
:mod:`bnkit.study`). With ``--model`` it runs the same fine-tuning policies on your model and labelled data:

    bnkit study --model mypkg.nets:resnet --weights ckpt.pt --target-data target.pt [--source-data source.pt]

Labelled data (``--source-data``/``--target-data``): a ``.pt``/``.pth`` file holding an ``(inputs, labels)``
pair or a dict with inputs under ``x``/``inputs``/``input``/``data``/``images`` and labels under
``y``/``labels``/``label``/``targets``/``target``; a ``.npz`` with the same keys; or ``package.module:factory``
returning such a pair or an iterable of ``(inputs, labels)`` batches. Models as every bnkit command takes them.

With ``--framework keras`` the study runs with Keras 3 (``--backend tensorflow|jax|torch`` picks Keras's backend;
see :mod:`bnkit.study.keras_study`): every policy is reported with "Keras defaults" and "with exact statistics".
``--model package.module:factory`` then names a function returning a new Keras model for the digits
(``[N, 8, 8, 1]`` images in, 10 logits out), which the study pre-trains. The Keras path never imports torch
unless the backend is torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnkit.cli.commands import add_backend, add_trust_pickle
from bnkit.cli.files import CliError, is_factory_spec
from bnkit.cli.output import Table

if TYPE_CHECKING:
    import torch

NAME = "study"
HELP = "should I freeze BatchNorm when fine-tuning? measured answer"

_INPUT_KEYS = ("x", "inputs", "input", "data", "images")
_LABEL_KEYS = ("y", "labels", "label", "targets", "target")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from exc


def _subset_option(
    parser: argparse.ArgumentParser, flag: str, metavar: str, what: str, names: str, choices: list[str] | None = None
) -> None:
    """An option naming some of a fixed set of things; left out, the study runs them all."""
    parser.add_argument(
        flag, nargs="+", default=None, metavar=metavar, choices=choices, help=f"{what} (default all: {names})"
    )


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``study``.

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> args = main_parser("study").parse_args(["study", "--quick", "--seeds", "0", "1", "2"])
        >>> args.quick, args.seeds, args.out
        (True, [0, 1, 2], 'bnkit-study')
    """
    from bnkit.study.catalog import BATCH_NORMS
    from bnkit.study.catalog import DOMAIN_NAMES as DOMAINS
    from bnkit.study.catalog import POLICY_INFO as POLICIES

    policy_help = ", ".join(f"{p.number}={k}" for k, p in POLICIES.items())
    parser = subparsers.add_parser(
        NAME,
        help=HELP,
        description="Pre-train a small BatchNorm network on scikit-learn's bundled digits, adapt it to shifted "
        "target domains with six fine-tuning policies (BN frozen or not, BN only, recalibration...), train "
        "from scratch at batch sizes 2-32 with BatchNorm, GroupNorm, Batch Renorm and ghost batches, check "
        "bnkit.fuse, and report mean and spread over seeds with a conclusion derived from the numbers. With "
        "--model: the same policies on your model and labelled data.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs and batch sizes (about a minute)")
    parser.add_argument(
        "--framework",
        choices=["torch", "keras"],
        default="torch",
        help="run the study with PyTorch (default) or with Keras 3 (--backend picks Keras's backend)",
    )
    add_backend(parser)
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="SEED",
        help="seeds to repeat everything with (default 0 1 2; at least 3 for a spread)",
    )
    _subset_option(parser, "--domains", "DOMAIN", "target domains", ", ".join(DOMAINS), list(DOMAINS))
    _subset_option(parser, "--policies", "POLICY", "policies by name or number", policy_help)
    _subset_option(
        parser,
        "--norms",
        "NORM",
        "norms of the batch-size experiment",
        ", ".join(BATCH_NORMS),
        list(BATCH_NORMS),
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        metavar="B",
        help="batch sizes of the batch-size experiment (default 2 4 8 16 32; --quick 2 8 32)",
    )
    parser.add_argument("--no-batch-study", action="store_true", help="skip the batch-size experiment")
    parser.add_argument(
        "--no-fuse", action="store_true", help="skip the bnkit.fuse check (Keras: the bnkit.keras.fold check)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default: one per CPU core); results do not depend on it",
    )
    parser.add_argument(
        "--out",
        default="bnkit-study",
        metavar="DIR",
        help="output directory for results.json, report.md and plots (default bnkit-study)",
    )
    own = parser.add_argument_group("your own model and data")
    own.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="package.module:factory or a module saved with torch.save (trusted files only); with --framework "
        "keras: package.module:factory returning a new Keras model for the digits",
    )
    own.add_argument("--weights", default=None, metavar="CKPT", help="state dict to load into --model")
    add_trust_pickle(own)
    own.add_argument(
        "--source-data",
        default=None,
        metavar="DATA",
        help="labelled source-domain data (optional: source accuracy, reference shift score)",
    )
    own.add_argument("--target-data", default=None, metavar="DATA", help="labelled target-domain data")
    own.add_argument(
        "--target-split",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="share of each target class used for adaptation, the rest for testing (0.5)",
    )
    own.add_argument(
        "--head",
        default=None,
        metavar="NAME",
        help="qualified name of the head trained by policies 1 and 6 (default: the last Linear)",
    )
    own.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 30; --quick 15)")
    own.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size (32)")
    own.add_argument("--lr", type=float, default=1e-3, help="fine-tuning Adam learning rate (1e-3)")
    parser.set_defaults(func=run, render=render)
    return parser


def _labelled_from_object(obj: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torch

    def tensor(value: Any, what: str) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CliError(f"data {where}: {what} must be a tensor or array, found a {type(value).__name__}")
        return value

    if isinstance(obj, dict):
        xk = next((k for k in _INPUT_KEYS if k in obj), None)
        yk = next((k for k in _LABEL_KEYS if k in obj), None)
        if xk is None or yk is None:
            raise CliError(
                f"data {where}: labelled data needs inputs under one of {', '.join(_INPUT_KEYS)} and labels "
                f"under one of {', '.join(_LABEL_KEYS)}; found keys {', '.join(map(str, obj))}"
            )
        return tensor(obj[xk], "inputs"), tensor(obj[yk], "labels")
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], (tuple, list)):
        return tensor(obj[0], "inputs"), tensor(obj[1], "labels")
    if isinstance(obj, (tuple, list)) or hasattr(obj, "__iter__"):
        xs, ys = [], []
        for batch in obj:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise CliError(f"data {where}: expected (inputs, labels) batches, found a {type(batch).__name__}")
            xs.append(tensor(batch[0], "inputs"))
            ys.append(tensor(batch[1], "labels"))
        if not xs:
            raise CliError(f"data {where} yielded no batches")
        return torch.cat(xs), torch.cat(ys)
    raise CliError(f"data {where}: expected an (inputs, labels) pair, a dict or (inputs, labels) batches")


def load_labelled(spec: str) -> Any:
    """Load labelled data (see the module docstring for the formats) as a :class:`bnkit.study.data.Dataset`.

    Raises:
        CliError: missing file, unknown format, no labels, labels that are not one integer per sample.

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.pt"
        >>> torch.save((torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])), path)
        >>> len(load_labelled(str(path)))
        4
    """
    import numpy as np
    import torch

    from bnkit.study.data import Dataset

    if is_factory_spec(spec):
        from bnkit.cli.io import call_factory

        x, y = _labelled_from_object(call_factory(spec, "data"), spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise CliError(f"data file {spec!r} not found")
        suffix = path.suffix.lower()
        if suffix in (".pt", ".pth"):
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:  # corrupt file, pickled code
                raise CliError(f"cannot load data file {spec!r}: {str(exc).strip().splitlines()[0]}") from exc
            x, y = _labelled_from_object(obj, spec)
        elif suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as arrays:
                    x, y = _labelled_from_object({k: arrays[k] for k in arrays.files}, spec)
            except (OSError, ValueError) as exc:
                raise CliError(f"cannot load data file {spec!r}: {str(exc).strip().splitlines()[0]}") from exc
        else:
            raise CliError(
                f"labelled data {spec!r}: use a .pt/.pth (inputs, labels) pair, a .npz with x and y arrays, or "
                "package.module:factory (a .npy file holds no labels)"
            )
    if x.ndim < 2 or len(x) == 0:
        raise CliError(f"data {spec!r}: inputs of shape {list(x.shape)}; expected [samples, ...] with samples > 0")
    if not x.is_floating_point() or x.dtype == torch.float64:
        x = x.float()
    if y.ndim != 1 or (y.is_floating_point() and not torch.equal(y, y.round())) or len(y) != len(x):
        raise CliError(
            f"data {spec!r}: labels must be one class index per sample (got shape {list(y.shape)} for {len(x)} samples)"
        )
    return Dataset(x, y.long())


def _command_line(argv: Sequence[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "bnkit " + " ".join(shlex.quote(a) for a in args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the bundled study, or the custom one when ``--model`` is given; returns the results dict.

    Example:
        >>> run(argparse.Namespace(quick=True, model=None))  # doctest: +SKIP
    """
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out!r} exists and is not a directory")
    console = _stderr_console()
    command = _command_line()
    if getattr(args, "framework", "torch") == "keras":
        return _run_keras(args, command)
    if getattr(args, "backend", None) is not None:
        raise CliError("--backend chooses Keras's backend: it needs --framework keras")
    if args.model is not None:
        return _run_custom(args, console, command)
    if args.weights or args.source_data or args.target_data:
        raise CliError("--weights, --source-data and --target-data need --model")
    from dataclasses import replace

    from bnkit.study.experiments import StudyConfig
    from bnkit.study.run import run_study

    try:
        cfg = StudyConfig.quick_config() if args.quick else StudyConfig()
        overrides = _design_overrides(args)
        if args.norms is not None:
            overrides["batch_norms"] = tuple(args.norms)
        if args.batch_sizes is not None:
            overrides["batch_sizes"] = tuple(args.batch_sizes)
        if args.no_batch_study:
            overrides["batch_sizes"] = ()
        if args.no_fuse:
            overrides["fuse"] = False
        if args.epochs is not None:
            overrides["finetune"] = replace(cfg.finetune, epochs=args.epochs)
        cfg = replace(cfg, **overrides)
        return run_study(
            cfg, out=args.out, jobs=args.jobs, console=console, command=command, progress=console is not None
        )
    except ImportError as exc:
        raise CliError(f'{exc} (pip install "bnkit[study]")') from exc


def _design_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The design options both studies share (--seeds, --domains, --policies) as config overrides."""
    chosen = {"seeds": args.seeds, "domains": args.domains, "policies": args.policies}
    return {key: tuple(value) for key, value in chosen.items() if value is not None}


def _run_keras(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """``--framework keras``: check the options that apply, choose the backend, then run the Keras study."""
    from dataclasses import replace

    from bnkit.cli.keras_io import select_backend

    torch_only = {
        "--weights": args.weights,
        "--source-data": args.source_data,
        "--target-data": args.target_data,
        "--norms": args.norms,
        "--batch-sizes": args.batch_sizes,
        "--jobs": args.jobs,
        "--trust-pickle": getattr(args, "trust_pickle", False) or None,
    }
    given = [flag for flag, value in torch_only.items() if value is not None]
    if given:
        raise CliError(
            f"{', '.join(given)}: not part of the Keras study (it runs the bundled digits design; --model names "
            "a Keras model factory); leave them out or use --framework torch"
        )
    if args.model is not None and not is_factory_spec(args.model):
        raise CliError(
            f"--model {args.model!r}: with --framework keras give package.module:factory returning a new Keras model"
        )
    select_backend(args.backend)
    from bnkit.cli.files import import_attr
    from bnkit.study.catalog import FinetuneSettings
    from bnkit.study.keras_study import KerasStudyConfig, run_keras_study

    factory = import_attr(args.model, "model") if args.model is not None else None
    if factory is not None and not callable(factory):
        raise CliError(f"--model {args.model!r} is not callable: name a function returning a new Keras model")
    try:
        cfg = KerasStudyConfig.quick_config() if args.quick else KerasStudyConfig()
        overrides = _design_overrides(args)
        if args.no_fuse:
            overrides["fold"] = False
        settings = FinetuneSettings(
            epochs=args.epochs or cfg.finetune.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            head=args.head or ("head" if factory is None else ""),
        )
        cfg = replace(cfg, finetune=settings, **overrides)
        return run_keras_study(cfg, out=args.out, factory=factory, model_spec=args.model, command=command)
    except ImportError as exc:
        raise CliError(f'{exc} (pip install "bnkit[study,keras]")') from exc
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc).splitlines()[0]) from exc


def _run_custom(args: argparse.Namespace, console: Any, command: str) -> dict[str, Any]:
    from bnkit.cli.io import load_model, require_eager
    from bnkit.study.custom import run_custom_study
    from bnkit.study.policies import POLICIES, FinetuneSettings

    if args.target_data is None:
        raise CliError("--model needs --target-data: labelled data of the domain to adapt to")
    model = require_eager(load_model(args.model, args.weights, trust_pickle=getattr(args, "trust_pickle", False)), NAME)
    target = load_labelled(args.target_data)
    source = load_labelled(args.source_data) if args.source_data else None
    settings = FinetuneSettings(
        epochs=args.epochs or (15 if args.quick else 30),
        batch_size=args.batch_size,
        lr=args.lr,
        head=args.head or "",
    )
    if args.head is not None:
        try:
            model.get_submodule(args.head)
        except AttributeError as exc:
            raise CliError(f"--head {args.head!r}: the model has no module of that name") from exc
    name = Path(args.target_data).stem if not is_factory_spec(args.target_data) else "target"
    return run_custom_study(
        model,
        target,
        source,
        seeds=tuple(args.seeds) if args.seeds else (0, 1, 2),
        policies=tuple(args.policies) if args.policies else tuple(POLICIES),
        finetune=settings,
        target_train_fraction=args.target_split,
        target_name=name,
        fuse=not args.no_fuse,
        out=args.out,
        console=console,
        progress=console is not None,
        command=command,
    )


def _stderr_console() -> Any:
    if not sys.stderr.isatty() or os.environ.get("BNKIT_PLAIN"):
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


def render(data: dict[str, Any]) -> list[Table | str]:
    """The policy table, the shift table, the batch-size table and the conclusion.

    Example:
        >>> render({"summary": {"finetune": {}, "winners": {}}, "conclusion": ["done"]})[-1]
        'done'
    """
    from bnkit.study.report import batch_table, policy_table, shift_table

    summary = data.get("summary", {})
    blocks: list[Table | str] = []
    if data.get("framework") == "keras" and summary.get("finetune"):
        from bnkit.study.keras_report import keras_policy_table

        header, rows = keras_policy_table(summary)
        blocks.append(Table("held-out target accuracy (%): Keras defaults | with exact statistics", header, rows))
        summary = {k: v for k, v in summary.items() if k != "finetune"}
    if summary.get("finetune"):
        header, rows = policy_table(summary)
        blocks.append(Table("held-out target accuracy (%), mean ± std over seeds; * = best", header, rows))
    if summary.get("shift"):
        header, rows = shift_table(summary)
        blocks.append(Table("bnkit.shift score of the source model vs what won", header, rows))
    if summary.get("batch_size"):
        header, rows = batch_table(summary, data.get("batch_norm_titles"))
        blocks.append(Table("accuracy (%) vs per-step batch size, trained from scratch", header, rows))
    blocks.extend(data.get("conclusion", []))
    files = data.get("files")
    if files:
        blocks.append("written: " + ", ".join(files.values()))
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit study`` alone.

    Example:
        >>> main(["--quick"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
