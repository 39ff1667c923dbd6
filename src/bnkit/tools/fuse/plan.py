"""Deciding which BatchNorm folds into which layer, on each module's ``torch.fx`` graph (or, for an
``nn.Sequential`` fx cannot trace, on its children pairwise). All names are qualified from the model root."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx as fx
from torch import nn

from bnkit.shared.errors import first_line
from bnkit.tools.fuse.norms import NormView, norm_view
from bnkit.tools.fuse.rules import Verdict, after_verdict, before_verdict, layer_problem, norm_problem
from bnkit.tools.fuse.trace import LAYERS, RecordedRun, TraceFailure, is_leaf_kind, trace

__all__ = ["Fold", "Plan", "make_plan"]


@dataclass(frozen=True)
class Fold:
    """One planned fold: BatchNorm ``bn`` into ``layer``, on its output side (``after``) or input side.

    Example:
        >>> Fold("bn1", "conv1", "after")
        Fold(bn='bn1', layer='conv1', position='after', note='')
    """

    bn: str
    layer: str
    position: Literal["after", "before"]
    note: str = ""


@dataclass
class Plan:
    """The folds to apply, in order, and every BatchNorm-like layer left alone with its reason.

    Attributes:
        folds: The folds, in the order they must be applied.
        skipped: ``{qualified name: reason}`` for every recognised BatchNorm that is not folded.
        notes: Model-level remarks (forwards torch.fx cannot trace).

    Example:
        >>> plan = make_plan(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)), None)
        >>> plan.folds, plan.skipped["1"]
        ([], 'track_running_stats=False: it normalises with batch statistics in eval, not an affine map')
    """

    folds: list[Fold] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def make_plan(root: nn.Module, run: RecordedRun | None) -> Plan:
    """Plan the folds of ``root`` (an eval-mode copy); ``run`` gives the ranks layers saw (None: unknown).

    Example:
        >>> make_plan(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), None).folds[0].layer
        '0'
    """
    return _Analysis(root, run).run()


@dataclass(frozen=True)
class _LayerAt:
    """The layer a graph node calls, or why there is none fit to absorb a BN."""

    name: str | None
    module: nn.Module | None
    problem: str | None


class _Analysis:
    def __init__(self, root: nn.Module, run: RecordedRun | None) -> None:
        self.root = root
        self.recorded = run
        self.names = {id(m): name for name, m in root.named_modules()}
        self.multiplicity = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.plan = Plan()
        self.opaque: set[int] = set()
        self.untraceable: list[str] = []

    def run(self) -> Plan:
        queue: list[nn.Module] = [self.root]
        visited: set[int] = set()
        while queue:
            module = queue.pop(0)
            if id(module) in visited:
                continue
            visited.add(id(module))
            queue.extend(self._analyse_module(module))
        folded = {op.bn for op in self.plan.folds}
        skips = self.plan.skipped
        self.plan.skipped = {}
        for name, module in self.root.named_modules():
            if norm_view(module) is None or name in folded:
                continue
            owner = next((f for f in folded if name.startswith(f + ".")), None)
            if owner is not None:  # e.g. timm SplitBatchNorm2d's training-only auxiliary BatchNorms
                self.plan.notes.append(f"{name}: removed with {owner}, the folded BatchNorm that holds it")
                continue
            self.plan.skipped[name] = skips.get(name) or self._untraced_reason(name)
        return self.plan

    def _rank(self, name: str) -> int | None:
        return None if self.recorded is None else self.recorded.rank(name)

    def _untraced_reason(self, name: str) -> str:
        owners = [p for p in self.untraceable if p == "" or name.startswith(p + ".")]
        if owners:
            owner = max(owners, key=len) or "the model"
            return f"called from the forward of {owner}, which torch.fx cannot trace (see notes)"
        return "not called as a module by any traced forward"

    def _analyse_module(self, module: nn.Module) -> list[nn.Module]:
        """Analyse one module's forward; return the submodules that need their own analysis."""
        prefix = self.names[id(module)]
        label = prefix or f"<{type(module).__name__}>"
        sequential = type(module).forward is nn.Sequential.forward
        try:
            graph = trace(module, self.opaque)
        except TraceFailure as failure:
            self.untraceable.append(prefix)
            self.plan.notes.append(
                f"{label}: torch.fx cannot trace its forward ({first_line(failure.error, with_type=True)}); "
                + (
                    "folding nn.Sequential neighbours and looking inside its children"
                    if sequential
                    else "looking inside its children only"
                )
            )
            if sequential:
                self._analyse_sequential(module, prefix)
            return [c for c in module.children() if not is_leaf_kind(c)]
        self._analyse_graph(graph, module, prefix)
        nested = []
        for node in graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(str(node.target))
                if not is_leaf_kind(sub) and any(norm_view(m) is not None for m in sub.modules()):
                    nested.append(sub)
        return nested

    def _record(self, op: Fold) -> None:
        self.plan.folds.append(op)

    # ---- graph level

    def _analyse_graph(self, graph: fx.Graph, module: nn.Module, prefix: str) -> None:
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]

        def qualified(target: Any) -> str:
            return f"{prefix}.{target}" if prefix else str(target)

        def touched(target: str) -> bool:
            return any(a == target or a.startswith(target + ".") for a in attrs)

        def layer_of(node: Any) -> _LayerAt:
            if isinstance(node, fx.Node) and node.op == "placeholder":
                return _LayerAt(None, None, f"it reads the forward's argument `{node.target}` directly")
            if not isinstance(node, fx.Node) or node.op != "call_module":
                what = node.target if isinstance(node, fx.Node) else type(node).__name__
                return _LayerAt(
                    None, None, f"`{getattr(what, '__name__', what)}` is not a Conv/ConvTranspose/Linear module"
                )
            sub = module.get_submodule(str(node.target))
            name = qualified(node.target)
            if not isinstance(sub, LAYERS):
                return _LayerAt(None, None, f"{name} ({type(sub).__name__}) is not a Conv/ConvTranspose/Linear module")
            problem = layer_problem(name, sub, self.multiplicity)
            if problem is None and calls[str(node.target)] > 1:
                problem = f"{name} is called {calls[str(node.target)]} times"
            if problem is None and touched(str(node.target)):
                problem = f"the forward reads {name}'s parameters directly"
            return _LayerAt(name, sub, problem)

        bn_nodes: list[tuple[fx.Node, str, NormView]] = []
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            view = norm_view(module.get_submodule(str(node.target)))
            if view is None:
                continue
            name = qualified(node.target)
            problem = norm_problem(view, self.multiplicity)
            if problem is None and calls[str(node.target)] > 1:
                problem = f"called {calls[str(node.target)]} times; each call would need its own fold"
            if problem is None and (len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node)):
                problem = "called with extra arguments (training=/mask=), so it is not a plain inference BN"
            if problem is None and touched(str(node.target)):
                problem = "the forward reads its tensors directly"
            if problem is not None:
                self.plan.skipped[name] = problem
            else:
                bn_nodes.append((node, name, view))

        # Pass 1, BN after a layer (always exact); in graph order so chains like conv -> BN -> BN collapse.
        pending = []
        for node, name, view in bn_nodes:
            producer = node.args[0]
            layer = layer_of(producer)
            verdict = Verdict(layer.problem)
            if verdict.ok and len(producer.users) > 1:
                verdict = Verdict(f"{layer.name}'s output also feeds {len(producer.users) - 1} other consumer(s)")
            if verdict.ok:
                verdict = after_verdict(layer.name, layer.module, view, self._rank(layer.name))
            if verdict.ok:
                self._record(Fold(name, layer.name, "after", verdict.note))
                if not view.post:  # a BN with an activation stays in the graph as that activation
                    node.replace_all_uses_with(producer)
                    graph.erase_node(node)
            else:
                pending.append((node, name, view, f"input: {verdict.problem}"))

        # Pass 2, BN before a layer where exact; in reverse order so BN -> BN -> conv collapses.
        for node, name, view, after_problem in reversed(pending):
            users = list(node.users)
            if len(users) != 1:
                verdict = Verdict(f"its output feeds {len(users)} consumers")
            else:
                user = users[0]
                layer = layer_of(user)
                verdict = Verdict(layer.problem)
                if verdict.ok and (len(user.args) != 1 or user.kwargs):
                    verdict = Verdict(f"{layer.name} is called with extra arguments")
                if verdict.ok:
                    verdict = before_verdict(view, self._rank(name), layer.name, layer.module)
            if verdict.ok:
                self._record(Fold(name, layer.name, "before", verdict.note))
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            else:
                self.plan.skipped[name] = f"{after_problem}; output: {verdict.problem}"

    # ---- module patterns (untraceable nn.Sequential)

    def _analyse_sequential(self, seq: nn.Module, prefix: str) -> None:
        children = list(seq.named_children())
        counts = Counter(id(m) for _, m in children)

        def qualified(key: str) -> str:
            return f"{prefix}.{key}" if prefix else key

        used: set[int] = set()
        for i, (key, bn) in enumerate(children):
            view = norm_view(bn)
            if view is None:
                continue
            name = qualified(key)
            problem = norm_problem(view, self.multiplicity)
            if problem is None and counts[id(bn)] > 1:
                problem = "appears several times in the Sequential"
            if problem is not None:
                self.plan.skipped[name] = problem
                continue
            reasons = []
            for j, position in ((i - 1, "after"), (i + 1, "before")):
                if not 0 <= j < len(children):
                    reasons.append(f"nothing {position}")
                    continue
                layer_key, layer = children[j]
                layer_name = qualified(layer_key)
                if not isinstance(layer, LAYERS):
                    reasons.append(f"{layer_name} ({type(layer).__name__}) is not a Conv/ConvTranspose/Linear")
                    continue
                verdict = Verdict(layer_problem(layer_name, layer, self.multiplicity))
                if verdict.ok and counts[id(layer)] > 1:
                    verdict = Verdict(f"{layer_name} appears several times in the Sequential")
                if verdict.ok and position == "after":
                    verdict = after_verdict(layer_name, layer, view, self._rank(layer_name))
                elif verdict.ok:
                    verdict = before_verdict(view, self._rank(name), layer_name, layer)
                if verdict.ok and position == "after" and id(layer) in used:
                    verdict = Verdict(f"{layer_name} already absorbed a BN after it")
                if verdict.ok:
                    self._record(Fold(name, layer_name, position, verdict.note))
                    if position == "after":
                        used.add(id(layer))
                    break
                reasons.append(verdict.problem)
            else:
                self.plan.skipped[name] = "; ".join(r for r in reasons if r)
