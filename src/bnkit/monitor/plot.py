"""Plot a :class:`bnkit.Monitor` log: drift and running-variance trajectories of every layer, in one PNG.

The figure has four panels. Two show one line per layer over the steps (drift between batch and running
statistics; channel-averaged running variance), coloured by depth with a colour bar, so that 50 or 500
layers stay readable where a legend would not (models with at most 12 layers get a legend instead). Two
heat maps (layers down, steps across) show every layer at once: the drift, and the ratio of batch to running
variance. Steps with alerts are marked on the drift panel.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bnkit.shared.monitor_log import JSONL_NAME, read_log

__all__ = ["plot"]

_LEGEND_MAX = 12
_MAX_COLUMNS = 1000
_MAX_LABELS = 30


def plot(
    log_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] = "bn_monitor.png",
    *,
    layers: str | Iterable[str] | None = None,
    size: tuple[float, float] = (14.0, 10.0),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Draw the monitor log in ``log_dir`` (or a ``bn_monitor.jsonl`` path) as a multi-panel PNG at ``out``.

    Panels: drift per layer over steps (log scale; alert steps marked), running variance (channel average)
    per layer over steps (log scale), and heat maps of drift and of ``log10(batch_var / running_var)`` with
    layers down and steps across. Lines are coloured by layer depth. When a log holds several runs (the file
    is appended to), a later record of the same layer and step replaces an earlier one.

    Args:
        log_dir: the ``log_dir`` given to :class:`bnkit.Monitor`, or its JSONL file.
        out: where to write the PNG; written atomically (temporary file, then rename).
        layers: only these layers: a glob on the qualified name or a list of globs.
        size: figure size in inches; the PNG is ``size[0] * dpi`` by ``size[1] * dpi`` pixels.
        dpi: pixels per inch.
        title: figure title; default names the log and counts layers, steps and alerts.

    Returns:
        The path of the PNG.

    Raises:
        ValueError: no log at ``log_dir``, no stats record (for the selected layers), ``out`` is the log
            itself, or a bad ``size``/``dpi``.

    Example:
        >>> import tempfile, torch
        >>> from bnkit.monitor import Monitor
        >>> d = tempfile.mkdtemp()
        >>> model = torch.nn.BatchNorm1d(3).train()
        >>> with Monitor(model, log_dir=d, tensorboard=False):
        ...     for _ in range(5):
        ...         _ = model(torch.randn(8, 3))
        >>> plot(d, f"{d}/bn.png", size=(8, 6), dpi=50).name
        'bn.png'
    """
    if (
        len(size) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in size)
        or not isinstance(dpi, int)
        or dpi <= 0
    ):
        raise ValueError(f"plot: size must be two positive inches and dpi a positive int, got {size!r}, {dpi!r}")
    source = Path(log_dir)
    log_file = source / JSONL_NAME if source.is_dir() else source
    out_path = Path(out)
    if out_path.exists() and log_file.exists() and out_path.resolve() == log_file.resolve():
        raise ValueError(f"plot: {str(out_path)!r} is the monitor log itself; pass another -o/out path")
    log = read_log(source)
    series, order = _series(log["stats"], layers)
    if not series:
        which = "" if layers is None else f" for layers={layers!r}"
        raise ValueError(f"{str(log_file)!r}: no stats records{which}; train with the monitor attached first")

    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    names = order
    depth = colors.Normalize(vmin=0, vmax=max(len(names) - 1, 1))
    cmap = matplotlib.colormaps["viridis"]
    use_legend = len(names) <= _LEGEND_MAX

    def label(name: str) -> str:
        return name or "(model)"

    def lines(ax: Any, key: str, ylabel: str, heading: str) -> None:
        drawn = False
        for i, name in enumerate(names):
            steps, values = _column(series[name], key)
            shown = [v if v is not None and v > 0 else math.nan for v in values]
            if any(not math.isnan(v) for v in shown):
                drawn = True
            ax.plot(steps, shown, color=cmap(depth(i)), lw=1.0 if len(names) > 20 else 1.5, label=label(name))
        if drawn:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(heading, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if use_legend:
            ax.legend(fontsize=7, ncol=2 if len(names) > 6 else 1, loc="best")
        else:
            bar = fig.colorbar(cm.ScalarMappable(norm=depth, cmap=cmap), ax=ax, pad=0.01)
            ticks = _tick_indices(len(names), 6)
            bar.set_ticks(ticks)
            bar.set_ticklabels([label(names[t]) for t in ticks], fontsize=7)
            bar.set_label("layer (by depth)", fontsize=8)

    lines(axes[0][0], "drift", "symmetric KL (mean over channels)", "drift: batch vs running statistics")
    lines(axes[0][1], "running_var", "running variance (mean over channels)", "running variance")

    alert_steps = sorted({a["step"] for a in log["alerts"] if a.get("layer") in series})
    for step in alert_steps[:100]:
        axes[0][0].axvline(step, color="red", lw=0.6, alpha=0.5, ls="--")
    if alert_steps:
        axes[0][0].set_title("drift: batch vs running statistics (red dashes: steps with alerts)", fontsize=10)

    all_steps = sorted({s for name in names for s in series[name]})
    if len(all_steps) > _MAX_COLUMNS:
        stride = math.ceil(len(all_steps) / _MAX_COLUMNS)
        all_steps = all_steps[::stride]

    def grid(key: str, transform: Any) -> list[list[float]]:
        rows = []
        for name in names:
            by_step = series[name]
            rows.append([transform(by_step.get(s), key) for s in all_steps])
        return rows

    def drift_value(record: dict[str, Any] | None, key: str) -> float:
        value = None if record is None else record.get(key)
        return value if value is not None and value > 0 and math.isfinite(value) else math.nan

    def ratio_value(record: dict[str, Any] | None, key: str) -> float:
        if record is None:
            return math.nan
        bv, rv = record.get("batch_var"), record.get("running_var")
        if bv is None or rv is None or not (bv > 0 and rv > 0) or not math.isfinite(bv / rv):
            return math.nan
        return math.log10(bv / rv)

    def heat(ax: Any, values: list[list[float]], norm: Any, cmap_name: str, heading: str, bar_label: str) -> None:
        edges = _edges(all_steps)
        mesh = ax.pcolormesh(edges, range(len(names) + 1), values, cmap=cmap_name, norm=norm, shading="flat")
        ticks = _tick_indices(len(names), _MAX_LABELS)
        ax.set_yticks([t + 0.5 for t in ticks])
        ax.set_yticklabels([label(names[t]) for t in ticks], fontsize=6 if len(ticks) > 15 else 8)
        ax.invert_yaxis()
        ax.set_xlabel("step")
        ax.set_title(heading, fontsize=10)
        bar = fig.colorbar(mesh, ax=ax, pad=0.01)
        bar.set_label(bar_label, fontsize=8)

    drift_grid = grid("drift", drift_value)
    finite = [v for row in drift_grid for v in row if not math.isnan(v)]
    if finite:
        low, high = min(finite), max(finite)
        norm = colors.LogNorm(vmin=low, vmax=high if high > low else low * 10)
    else:
        norm = colors.Normalize(vmin=0, vmax=1)
    heat(axes[1][0], drift_grid, norm, "magma", "drift per layer", "symmetric KL (log)")
    ratio_grid = grid("ratio", ratio_value)
    finite = [abs(v) for row in ratio_grid for v in row if not math.isnan(v)]
    bound = max(max(finite, default=0.0), 1e-3)
    heat(
        axes[1][1],
        ratio_grid,
        colors.Normalize(vmin=-bound, vmax=bound),
        "coolwarm",
        "batch variance / running variance",
        "log10 ratio",
    )

    steps_seen = len({s for name in names for s in series[name]})
    fig.suptitle(
        title
        if title is not None
        else f"{log_file.name}: {len(names)} BatchNorm layers, {steps_seen} recorded steps, "
        f"{len([a for a in log['alerts'] if a.get('layer') in series])} alerts",
        fontsize=12,
    )
    _save_atomically(fig, out_path, dpi)
    return out_path


def _series(
    stats: list[dict[str, Any]], layers: str | Iterable[str] | None
) -> tuple[dict[str, dict[int, dict[str, Any]]], list[str]]:
    """Records by layer then step (later records win), and layer names in order of first appearance."""
    patterns = None if layers is None else [layers] if isinstance(layers, str) else list(layers)
    series: dict[str, dict[int, dict[str, Any]]] = {}
    for record in stats:
        name = record.get("layer")
        step = record.get("step")
        if not isinstance(name, str) or not isinstance(step, int):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        series.setdefault(name, {})[step] = record
    return series, list(series)


def _column(by_step: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    steps = sorted(by_step)
    return steps, [by_step[s].get(key) for s in steps]


def _edges(steps: list[int]) -> list[float]:
    """Cell edges around each step (half-way to its neighbours) for the heat maps."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(steps)]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def _tick_indices(count: int, most: int) -> list[int]:
    if count <= most:
        return list(range(count))
    stride = math.ceil(count / most)
    ticks = list(range(0, count, stride))
    if ticks[-1] != count - 1:
        # The last layer is always labelled; a tick too close to it would overlap its label.
        if count - 1 - ticks[-1] <= stride / 2:
            ticks.pop()
        ticks.append(count - 1)
    return ticks


def _save_atomically(fig: Any, out: Path, dpi: int) -> None:
    directory = out.parent if str(out.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"plot: the folder of {str(out)!r} does not exist; create it or pass another path")
    if out.is_dir():
        raise ValueError(f"plot: {str(out)!r} is a directory; pass a file name such as {str(out / 'bn.png')!r}")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, dpi=dpi, format="png")
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
