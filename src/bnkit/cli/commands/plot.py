"""``bnkit plot LOGDIR -o OUT.png``: draw a :class:`bnkit.Monitor` log as a multi-panel PNG (bnkit.plot)."""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Sequence
from typing import Any

from bnkit.cli.io import CliError
from bnkit.cli.output import Table

NAME = "plot"
HELP = "plot a bnkit.Monitor log directory to a PNG"


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plot``.

    Example:
        >>> from bnkit.cli.main import build_parser as main_parser
        >>> main_parser("plot").parse_args(["plot", "runs/bn", "-o", "bn.png"]).output
        'bn.png'
    """
    parser = subparsers.add_parser(
        NAME,
        help=HELP,
        description="Draw the log written by bnkit.Monitor (LOGDIR/bn_monitor.jsonl, or the file itself) as one "
        "PNG: drift between batch and running statistics and running variance per layer over the steps "
        "(coloured by depth), and heat maps of drift and of batch/running variance for every layer. Readable "
        "with hundreds of layers. The log is never changed; OUT is written atomically.",
    )
    parser.add_argument("log_dir", metavar="LOGDIR", help="the log_dir given to bnkit.Monitor, or its JSONL file")
    parser.add_argument(
        "-o", "--output", metavar="OUT", default="bn_monitor.png", help="PNG to write (default bn_monitor.png)"
    )
    parser.add_argument(
        "--layers",
        metavar="GLOB",
        nargs="+",
        default=None,
        help="only layers whose qualified name matches one of these globs (e.g. 'layer4.*')",
    )
    parser.add_argument(
        "--size",
        metavar="W,H",
        default="14,10",
        help="figure size in inches (default 14,10); the PNG is W*dpi by H*dpi pixels",
    )
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100)")
    parser.add_argument("--title", default=None, help="figure title (default: log name and counts)")
    parser.set_defaults(func=run, render=render)
    return parser


def _parse_size(text: str) -> tuple[float, float]:
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(float(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 2 or not all(0 < v <= 200 for v in size):
        raise CliError(f"--size {text!r}: expected two positive inches like 14,10")
    return size[0], size[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Draw the PNG; returns where it went, its size in pixels and what the log held.

    Example:
        >>> run(argparse.Namespace(log_dir="missing-dir", output="bn.png", layers=None, size="14,10",
        ...                        dpi=100, title=None))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: 'missing-dir/bn_monitor.jsonl': no monitor log here; ...
    """
    from bnkit.monitor.monitor import read_log
    from bnkit.monitor.plot import plot

    width, height = _parse_size(args.size)
    if args.dpi < 1 or args.dpi > 1000:
        raise CliError(f"--dpi must be between 1 and 1000, got {args.dpi}")
    path = plot(args.log_dir, args.output, layers=args.layers, size=(width, height), dpi=args.dpi, title=args.title)
    log = read_log(args.log_dir)
    stats = [
        r for r in log["stats"] if args.layers is None or any(fnmatch.fnmatchcase(r["layer"], g) for g in args.layers)
    ]
    layers = {r["layer"] for r in stats}
    return {
        "output": str(path),
        "width": round(width * args.dpi),
        "height": round(height * args.dpi),
        "layers": len(layers),
        "steps": len({r["step"] for r in stats}),
        "alerts": len([a for a in log["alerts"] if a.get("layer") in layers]),
    }


def render(data: dict[str, Any]) -> list[Table | str]:
    """One line saying what was written.

    Example:
        >>> render({"output": "bn.png", "width": 1400, "height": 1000, "layers": 20, "steps": 50, "alerts": 1})
        ['wrote bn.png (1400x1000): 20 layers, 50 recorded steps, 1 alert']
    """
    alerts = data["alerts"]
    return [
        f"wrote {data['output']} ({data['width']}x{data['height']}): {data['layers']} layers, "
        f"{data['steps']} recorded steps, {alerts} alert{'s' if alerts != 1 else ''}"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit plot`` alone.

    Example:
        >>> main(["runs/bn", "-o", "bn.png"])  # doctest: +SKIP
    """
    from bnkit.cli.main import main as cli_main

    return cli_main([NAME, *(argv or [])])
