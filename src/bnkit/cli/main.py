"""The ``bnkit`` command line (also ``python -m bnkit``): registers the sub-commands and dispatches.

Each sub-command lives in ``bnkit/cli/commands/<name>.py`` (see :mod:`bnkit.cli.commands` for the contract).
Only the module of the command being run is imported, so a missing or broken command module (or its optional
dependencies) never breaks the others; ``bnkit --help`` lists every command from :data:`COMMANDS` without
importing any.

Exit status: 0 success; 1 a command's own failure verdict (``doctor --fail-on``); 2 a usage error or a problem
with the given files, model or data (one line on stderr; ``--debug`` adds the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from bnkit.cli.output import Result, emit, error_line

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "bnkit"

#: (name, module, one-line help) of every sub-command, in the order ``bnkit --help`` lists them.
COMMANDS: list[tuple[str, str, str]] = [
    ("explain", "bnkit.cli.commands.explain", "what every BatchNorm layer does in train() and eval(), and why"),
    ("summary", "bnkit.cli.commands.summary", "parameter counts, Keras style and PyTorch style side by side"),
    ("doctor", "bnkit.cli.commands.doctor", "find BatchNorm mistakes (ported momentum, frozen-stats traps, ...)"),
    ("shift", "bnkit.cli.commands.shift", "domain-shift score of data against the running statistics"),
    ("fuse", "bnkit.cli.commands.fuse", "fold BatchNorm into neighbouring conv/linear layers for deployment"),
    ("fold", "bnkit.cli.commands.fold", "fold BatchNormalization into neighbouring layers of a Keras model (.keras)"),
    ("recalibrate", "bnkit.cli.commands.recalibrate", "recompute running statistics from data (precise BN, AdaBN)"),
    ("convert", "bnkit.cli.commands.convert", "convert BatchNorm layers: bnkit, torch, sync, group"),
    ("study", "bnkit.cli.commands.study", "should I freeze BatchNorm when fine-tuning? measured answer"),
    ("plot", "bnkit.cli.commands.plot", "plot a bnkit.Monitor log directory to a PNG"),
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays available through --help)."""

    def error(self, message: str) -> NoReturn:
        error_line(self.prog, f"{message} (see {self.prog} --help)")
        raise SystemExit(2)


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--json and --debug, accepted before or after the sub-command name."""
    default: Any = False if top else argparse.SUPPRESS
    if "--json" not in parser._option_string_actions:
        parser.add_argument("--json", action="store_true", default=default, help="print results as JSON")
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", default=default, help="show the full traceback on errors")


def _command_name(argv: Sequence[str]) -> str | None:
    names = {name for name, _, _ in COMMANDS}
    for arg in argv:
        if arg in names:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command listed and ``command`` (if given) fully configured.

    Raises:
        ImportError (or anything its import raises): ``command``'s module cannot be imported.

    Example:
        >>> build_parser("summary").parse_args(["summary", "torch.nn:Identity"]).command
        'summary'
    """
    parser = _Parser(
        prog=PROG,
        description="bnkit: see what BatchNorm is doing, fix it, and make it behave.",
        epilog="Run 'bnkit COMMAND --help' for a command's options. Models: package.module:factory "
        "[--weights ckpt], a module saved with torch.save (trusted files only), a TorchScript file (summary), or a "
        "Keras 3 file NAME.keras (explain, summary, doctor, recalibrate, fold, convert --factory; "
        "--backend tensorflow|jax|torch).",
    )
    from bnkit import __version__

    parser.add_argument("--version", action="version", version=f"bnkit {__version__}")
    _add_common(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name, help_text in COMMANDS:
        if name != command:
            subparsers.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(module_name)
        if hasattr(module, "build_parser"):
            sub = module.build_parser(subparsers)
        else:  # the declarative contract: the parser is made here from the module's parts
            sub = subparsers.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text))
            module.add_arguments(sub)
            if hasattr(module, "run"):
                sub.set_defaults(func=module.run, render=getattr(module, "render", None))
        _add_common(sub, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example:
        >>> main(["summary", "torch.nn:Identity", "--json"])  # doctest: +ELLIPSIS
        {
          "rows": [
        ...
        0
    """
    from bnkit.cli.commands import join_size_arguments

    argv = join_size_arguments(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    command = _command_name(argv)
    try:
        parser = build_parser(command)
    except Exception as exc:  # a broken or missing command module must not take the others down
        if debug:
            traceback.print_exc()
        from bnkit.shared.errors import first_line

        error_line(PROG, f"the {command!r} command is not available: {first_line(exc, with_type=True)}")
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.command is None or not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    prog = f"{PROG} {args.command}"
    try:
        result = args.func(args)
        exit_code = 0
        if isinstance(result, Result):
            result, exit_code = result.data, result.exit_code
        emit(result, getattr(args, "render", None), as_json=bool(getattr(args, "json", False)))
        return exit_code
    except KeyboardInterrupt:
        error_line(prog, "interrupted")
        return 130
    except BrokenPipeError:  # `bnkit ... | head`
        return 0
    except Exception as exc:  # every failure becomes one line; --debug shows where
        if getattr(args, "debug", False) or debug:
            traceback.print_exc()
        error_line(prog, _describe(exc))
        return 2


def _describe(exc: BaseException) -> str:
    from bnkit.cli.files import CliError
    from bnkit.shared.errors import first_line

    if isinstance(exc, (CliError, ValueError, TypeError, FileNotFoundError)):
        return first_line(exc)
    return f"{first_line(exc, with_type=True)} (run with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
