"""``convert(model, "bnact")``: each BatchNorm followed by its activation becomes one ``bnkit.BatchNormAct``.

The pairs are found on the model's ``torch.fx`` graph (traced in training and in eval mode; untraceable
submodules are made opaque), else among the children of an ``nn.Sequential``. A pair fuses when the BatchNorm
(``torch.nn`` BatchNorm1d/2d/3d or SyncBatchNorm) is called once, its output goes to nothing but the activation,
and the activation is one ``bnkit.BatchNormAct`` computes (identity, ReLU, LeakyReLU and ELU with a positive
slope/alpha), as a module or a function. timm's ``BatchNormAct2d`` converts on its own (its ``act`` goes in).

Two rewrites, both exact:

- **module level** (the model keeps its class): the BatchNorm is replaced by the ``BatchNormAct`` and the
  activation module by ``nn.Identity``; used when the activation module is called once in the whole forward.
- **graph** (the result is a ``torch.fx.GraphModule``): needed when one activation module is called several
  times (torchvision's ResNet calls ``self.relu`` after ``bn1`` and after the residual sum) or the activation is
  a function; the activation node after the BatchNorm is removed from the graph and its other calls stay. It is
  refused when the traced graphs of training and eval mode differ, and with ``inplace=True``.

Whatever is left is listed with its reason (:func:`rewrite_bnact`).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnkit.tools.freeze import has_foreign_hooks
from bnkit.tools.fuse.trace import TraceFailure, trace

__all__ = ["Activation", "BnactPlan", "activation_of_module", "rewrite_bnact"]

SUPPORTED = "identity, relu, leaky_relu, elu"
_MODULES: dict[type[nn.Module], str] = {
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
}
_UNSUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Mish,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.RReLU,
)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_UNSUPPORTED_FUNCTIONS = {
    F.relu6: "relu6",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.hardtanh: "hardtanh",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.mish: "mish",
    F.selu: "selu",
    F.celu: "celu",
    F.softplus: "softplus",
    F.prelu: "prelu",
}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclass(frozen=True)
class Activation:
    """An activation ``bnkit.BatchNormAct`` computes.

    Example:
        >>> Activation("leaky_relu", negative_slope=0.2).kwargs()
        {'negative_slope': 0.2}
    """

    kind: str
    negative_slope: float = 0.01
    alpha: float = 1.0

    def kwargs(self) -> dict[str, float]:
        """The keyword arguments of ``BatchNormAct`` for it (slope or alpha)."""
        if self.kind == "leaky_relu":
            return {"negative_slope": self.negative_slope}
        if self.kind == "elu":
            return {"alpha": self.alpha}
        return {}


def _checked(kind: str, slope: Any = 0.01, alpha: Any = 1.0) -> Activation | str:
    for name, value, used in (("negative_slope", slope, kind == "leaky_relu"), ("alpha", alpha, kind == "elu")):
        if used and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            return f"{kind} with {name}={value!r} is not invertible (BatchNormAct needs {name} > 0)"
    return Activation(kind, float(slope), float(alpha))


def activation_of_module(module: nn.Module) -> Activation | str | None:
    """The :class:`Activation` a module computes, a reason string when it is an activation BatchNormAct does
    not support, or None when it is not an activation.

    Example:
        >>> activation_of_module(nn.ReLU(inplace=True)), activation_of_module(nn.Conv2d(1, 1, 1))
        (Activation(kind='relu', negative_slope=0.01, alpha=1.0), None)
        >>> activation_of_module(nn.ReLU6())
        'activation ReLU6 is not supported by bnkit.BatchNormAct (identity, relu, leaky_relu, elu)'
    """
    kind = _MODULES.get(type(module))
    if kind is not None:
        return _checked(kind, getattr(module, "negative_slope", 0.01), getattr(module, "alpha", 1.0))
    if isinstance(module, _UNSUPPORTED_MODULES):
        return f"activation {type(module).__name__} is not supported by bnkit.BatchNormAct ({SUPPORTED})"
    return None


def _constant(value: Any) -> bool:
    return not isinstance(value, (fx.Node, list, tuple, dict))


def _activation_of_node(node: fx.Node, modules: dict[str, nn.Module]) -> Activation | str | None:
    """What ``node`` computes on its first argument, as :func:`activation_of_module` answers for a module."""
    extra = [*node.args[1:], *node.kwargs.values()]
    if node.op == "call_module":
        if extra:
            return None
        return activation_of_module(modules[str(node.target)])
    if not all(_constant(value) for value in extra):
        return None
    if node.op == "call_function":
        target = node.target
        if target in _RELU_FUNCTIONS:
            return Activation("relu")
        if target is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return _checked("leaky_relu", slope=slope)
        if target is F.elu:
            alpha = node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
            return _checked("elu", alpha=alpha)
        if target in _UNSUPPORTED_FUNCTIONS:
            return f"activation {_UNSUPPORTED_FUNCTIONS[target]} is not supported by bnkit.BatchNormAct ({SUPPORTED})"
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and not extra:
            return Activation("relu")
        if node.target in ("sigmoid", "sigmoid_", "tanh", "tanh_"):
            return f"activation {node.target} is not supported by bnkit.BatchNormAct ({SUPPORTED})"
    return None


def _modifies_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node`` writes into its first argument."""
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {node.target}"


def _timm_problem(module: nn.Module) -> str:
    """Why timm's BatchNormAct2d ``module`` cannot become a ``bnkit.BatchNormAct`` ("" when it can)."""
    drop = getattr(module, "drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        name = type(drop).__name__
        return f"its drop layer {name} (between normalising and the activation) has no place in BatchNormAct"
    act = getattr(module, "act", None)
    activation = activation_of_module(act) if isinstance(act, nn.Module) else None
    if activation is None:
        return f"activation {type(act).__name__} is not supported by bnkit.BatchNormAct ({SUPPORTED})"
    return activation if isinstance(activation, str) else ""


def _written_in_place(name: str, graph: fx.Graph, modules: dict[str, nn.Module]) -> str:
    """The consumer that writes into the output of the module called ``name`` on ``graph`` ("" when none)."""
    for node in graph.nodes:
        if node.op == "call_module" and node.target == name:
            for user in node.users:
                if _modifies_in_place(user, modules) and user.args and user.args[0] is node:
                    return _describe(user)
    return ""


def _graph_activation(node: fx.Node, modules: dict[str, nn.Module], graph: fx.Graph) -> str:
    """How the report names an activation removed from the graph."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        calls = sum(1 for n in graph.nodes if n.op == "call_module" and modules.get(str(n.target)) is module)
        return f"{type(module).__name__} (module {node.target}, called {calls} times: this call removed on the graph)"
    return f"{_describe(node)} (a function, removed on the graph)"


@dataclass(frozen=True)
class _Pair:
    """One fusable pair on a graph: the BatchNorm's node, the activation's node, and how to rewrite it."""

    activation: Activation
    act_node: fx.Node
    module_level: str | None  # the activation module's name when replacing it by Identity is exact


def _pair_on_graph(
    name: str, graph: fx.Graph, modules: dict[str, nn.Module], registered: Counter[int], hidden: set[int]
) -> _Pair | str | tuple[str, str]:
    """The pair ``name`` forms on ``graph``; a ``str`` reason (an activation follows but cannot fuse), or a
    ``("kept", reason)`` tuple (no activation follows)."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if not calls:
        return ("absent", "not called on the traced graph")
    if id(modules[name]) in hidden:
        return "it also sits inside an untraceable submodule, whose calls of it are not on the graph"
    if len(calls) > 1:
        return f"called {len(calls)} times in forward; fusing would apply the activation at every call"
    node = calls[0]
    users = list(node.users)
    if len(users) != 1:
        names = ", ".join(_describe(u) for u in users)
        if not users:
            return ("kept", "its output is never used")
        return f"its output has {len(users)} consumers ({names}); fusing would hand the activated values to all"
    user = users[0]
    if not user.args or user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
        return ("kept", f"its output goes to {_describe(user)}, not to an activation")
    activation = _activation_of_node(user, modules)
    if activation is None:
        return ("kept", f"its output goes to {_describe(user)}, not to an activation")
    if isinstance(activation, str):
        return activation
    if activation.kind != "relu":
        # the low-memory backward keeps the activated output: a later in-place write into it would break it
        writers = [u for u in user.users if _modifies_in_place(u, modules) and u.args and u.args[0] is user]
        if writers:
            return (
                f"the activated output is then modified in place by {_describe(writers[0])}, which BatchNormAct's "
                "low-memory backward needs unchanged"
            )
    module_level = None
    if user.op == "call_module":
        act_module = modules[str(user.target)]
        if has_foreign_hooks(act_module):
            return f"the activation module {user.target!r} has hooks, which would stop firing"
        uses = sum(1 for n in graph.nodes if n.op == "call_module" and modules.get(str(n.target)) is act_module)
        if uses == 1 and registered[id(act_module)] == 1 and id(act_module) not in hidden:
            module_level = str(user.target)
    return _Pair(activation, user, module_level)


@dataclass
class BnactPlan:
    """What :func:`rewrite_bnact` did: the result and, by layer name, what was fused and what was left.

    Example:
        >>> BnactPlan(nn.Identity()).converted
        {}
    """

    model: nn.Module
    converted: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _traced(model: nn.Module, opaque: set[int]) -> tuple[fx.Graph | None, bool, str]:
    """The train-mode graph, whether the eval-mode graph is the same code, and the failure (or ""); ``opaque``
    receives the submodules fx could not trace through."""
    flags = {id(m): m.training for m in model.modules()}
    try:
        model.train()
        train_graph = trace(model, opaque)
        model.eval()
        eval_graph = trace(model, opaque)
    except TraceFailure as failure:
        return None, False, str(failure.error).splitlines()[0] if str(failure.error) else type(failure.error).__name__
    finally:
        for module in model.modules():
            module.training = flags[id(module)]
    same = train_graph.python_code("self").src == eval_graph.python_code("self").src
    return train_graph, same, ""


def _sequential_pair(model: nn.Module, name: str, registered: Counter[int]) -> tuple[Activation, str] | str | None:
    """The activation module after ``name`` in a plain ``nn.Sequential`` (and its name), a reason, or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return None
    keys = list(parent._modules)
    index = keys.index(child)
    if index + 1 >= len(keys):
        return None
    act_name = f"{parent_name}.{keys[index + 1]}" if parent_name else keys[index + 1]
    act_module = parent._modules[keys[index + 1]]
    activation = activation_of_module(act_module)
    if activation is None or isinstance(activation, str):
        return activation
    if registered[id(act_module)] != 1 or has_foreign_hooks(act_module):
        return f"the activation module {act_name!r} is shared or has hooks"
    return activation, act_name


def _build(module: nn.Module, activation: Activation, name: str) -> nn.Module:
    from bnkit.layers.batchnorm_act import BatchNormAct
    from bnkit.tools._convert_layers import _carry_freeze

    new = BatchNormAct.from_torch(module, activation.kind, **activation.kwargs())
    new.name = name or None
    _carry_freeze(module, new)  # a layer frozen by bnkit.freeze stays frozen
    return new


def _fill(source: nn.Module, target: nn.Module) -> None:
    """Give the GraphModule ``target`` the children of ``source`` themselves (fx made plain ``nn.Module``
    containers holding only what the graph calls), and the parameters and buffers of ``source``'s own that the
    graph does not read: same classes (``model.layer1[0]`` still indexes), same state-dict keys, same flags."""
    target.training = source.training
    for key, param in source._parameters.items():
        if param is not None and key not in target._parameters and not hasattr(target, key):
            target.register_parameter(key, param)
    for key, buffer in source._buffers.items():
        if buffer is not None and key not in target._buffers and not hasattr(target, key):
            target.register_buffer(key, buffer, persistent=key not in source._non_persistent_buffers_set)
    for key, child in source._modules.items():
        if child is not None:
            target.add_module(key, child)


def rewrite_bnact(model: nn.Module, found: list[tuple[str, nn.Module, str]], *, inplace: bool) -> BnactPlan:
    """Fuse the BatchNorm + activation pairs of ``model`` (already a copy unless ``inplace``) among the layers
    ``found`` (``(name, module, convert kind)``). Module-level replacements are made in ``model``; a graph
    rewrite returns a new ``torch.fx.GraphModule`` in :attr:`BnactPlan.model`.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> plan = rewrite_bnact(model, [("1", model[1], "torch")], inplace=True)
        >>> plan.converted, type(plan.model[2]).__name__
        ({'1': 'BatchNorm2d + ReLU (module 2) -> BatchNormAct(relu)'}, 'Identity')
    """
    from bnkit.layers.batchnorm_act import BatchNormAct
    from bnkit.tools._convert_layers import Leave, _carry_freeze, _kept_reason, _subclass

    plan = BnactPlan(model)
    registered: Counter[int] = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    candidates: list[tuple[str, nn.Module]] = []
    timm_layers: list[str] = []
    replacements: dict[str, nn.Module] = {}
    for name, module, kind in found:
        label = name or "<model>"
        if kind == "act":
            reason = _timm_problem(module)
            if reason:
                plan.skipped[label] = reason
                continue
            new = BatchNormAct.from_torch(module)
            new.name = name or None
            _carry_freeze(module, new)
            replacements[name] = new
            timm_layers.append(name)
            plan.converted[label] = f"{type(module).__name__} -> BatchNormAct({new.activation})"
        elif kind in ("torch", "torch-sync"):
            if not name:
                plan.skipped[label] = "the model itself is the BatchNorm: no activation follows it"
            else:
                candidates.append((name, module))
        elif kind == "bnact":
            plan.kept[label] = "already a bnkit.BatchNormAct"
        elif kind == "bnkit":
            plan.kept[label] = (
                "a bnkit.BatchNorm: convert it to 'torch' first to fuse it with its activation (its own settings "
                "are not carried into BatchNormAct)"
            )
        else:
            leave: Leave = _subclass(module, "bnact") if kind == "subclass" else _kept_reason(kind, "bnact")
            if kind in ("frozen", "frozen-act"):
                leave = Leave("frozen layer (statistics and gamma/beta fixed): BatchNormAct trains them", False)
            (plan.skipped if leave.warn else plan.kept)[label] = leave.reason

    invertible = [n for n in timm_layers if replacements[n].activation != "relu"]
    opaque: set[int] = set()
    graph, same, failure = _traced(model, opaque) if candidates or invertible else (None, True, "")
    modules = dict(model.named_modules())
    # modules inside an untraceable submodule may be called there too, where the graph does not show it
    hidden = {id(sub) for m in model.modules() if id(m) in opaque for sub in m.modules() if sub is not m}
    for name in invertible if graph is not None else ():
        writer = _written_in_place(name, graph, modules)
        if writer:
            del replacements[name], plan.converted[name]
            plan.skipped[name] = (
                f"its output is then modified in place by {writer}, which BatchNormAct's low-memory backward "
                "needs unchanged"
            )
    graph_pairs: dict[str, _Pair] = {}
    for name, module in candidates:
        result: Any = ("absent", "")
        if graph is not None:
            result = _pair_on_graph(name, graph, modules, registered, hidden)
        if isinstance(result, tuple) and result[0] == "absent":
            pair = _sequential_pair(model, name, registered)
            why = f"the model could not be traced ({failure})" if graph is None else "it is not on the traced graph"
            if pair is None:
                plan.kept[name] = f"{why} and no activation follows it in an nn.Sequential"
            elif isinstance(pair, str):
                plan.skipped[name] = pair
            else:
                activation, act_name = pair
                replacements[name] = _build(module, activation, name)
                replacements[act_name] = nn.Identity()
                plan.converted[name] = (
                    f"{type(module).__name__} + {type(modules[act_name]).__name__} (module {act_name}, its "
                    f"nn.Sequential neighbour) -> BatchNormAct({activation.kind})"
                )
            continue
        if isinstance(result, tuple):
            plan.kept[name] = result[1]
        elif isinstance(result, str):
            plan.skipped[name] = result
        elif result.module_level is not None:
            act_name = result.module_level
            replacements[name] = _build(module, result.activation, name)
            replacements[act_name] = nn.Identity()
            plan.converted[name] = (
                f"{type(module).__name__} + {type(modules[act_name]).__name__} (module {act_name}) -> "
                f"BatchNormAct({result.activation.kind})"
            )
        elif inplace:
            plan.skipped[name] = "needs a rewrite of the traced graph, which inplace=True cannot do"
        elif not same:
            plan.skipped[name] = "needs a rewrite of the traced graph, but the forward differs in train and eval mode"
        else:
            graph_pairs[name] = result
            replacements[name] = _build(module, result.activation, name)
            plan.converted[name] = (
                f"{type(module).__name__} + {_graph_activation(result.act_node, modules, graph)} -> "
                f"BatchNormAct({result.activation.kind})"
            )

    if graph_pairs:
        assert graph is not None
        for name, pair in graph_pairs.items():
            bn_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
            pair.act_node.replace_all_uses_with(bn_node)
            graph.erase_node(pair.act_node)
        # module-level pairs: their activation modules become Identity below, on the graph module too
        graph.lint()
        result_model = fx.GraphModule(model, graph, class_name=type(model).__name__)
        # pickling re-traces the code with this class, built without arguments: fx's own tracer does that
        result_model._tracer_cls = None
        _fill(model, result_model)
        plan.model = result_model
        plan.notes.append(
            f"the result is a torch.fx.GraphModule (class name {type(model).__name__}): {len(graph_pairs)} "
            "pair(s) needed the traced graph rewritten (an activation module called several times, or a "
            "functional activation); the model's own methods and attributes other than its modules are not kept"
        )
    target = plan.model
    for name, new in replacements.items():
        try:
            target.set_submodule(name, new)
        except AttributeError:
            # a module the GraphModule does not reference (an activation node removed from the graph)
            continue
    return plan
