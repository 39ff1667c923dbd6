"""Which ``torch.nn.BatchNorm{1,2,3}d`` a layer needs, without running the model where the model itself says it.

BatchNorm1d/2d/3d differ only in the input rank they accept (their arithmetic is the same), so a layer whose
class is not known (``SyncBatchNorm``, a ``bnkit.BatchNorm`` built by hand) gets it from the layers around it:
the module that produces its input or the one that consumes its output, found on the model's ``torch.fx``
graph (traced with every module in training mode too, so Inception/GoogLeNet auxiliary heads that only run in
training are seen), else among its siblings in an ``nn.Sequential``. Only modules that fix the rank (convolutions,
pooling, BatchNorm{1,2,3}d, Linear) answer; activations, dropout and elementwise arithmetic pass the question
on; anything else stops the search, so no guess is made across a reshape.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnkit.layers.kinds import describe_batchnorm, is_batchnorm_like

#: output/input rank per module class, as the BatchNorm dim (1: rank 2-3, 2: rank 4, 3: rank 5)
_DIM_OF_CLASS: dict[type[nn.Module], int] = {
    nn.Linear: 1,
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.InstanceNorm1d: 1,
    nn.InstanceNorm2d: 2,
    nn.InstanceNorm3d: 3,
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
# modules whose output has the rank of their input
_SAME_RANK_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
)
_SAME_RANK_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.cat,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.dropout,
    F.sigmoid,
}
_SAME_RANK_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_", "contiguous", "clone"}
_MAX_HOPS = 16


def module_dim(module: nn.Module) -> int | None:
    """The BatchNorm dim (1, 2, 3) a module's own class fixes for its input and output, or None.

    Example:
        >>> module_dim(nn.Conv3d(1, 1, 1)), module_dim(nn.Linear(2, 2)), module_dim(nn.ReLU())
        (3, 1, None)
    """
    for cls, dim in _DIM_OF_CLASS.items():
        if type(module) is cls:
            return dim
    for cls, dim in _DIM_OF_CLASS.items():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) and isinstance(module, cls):
            return dim
    recorded = getattr(module, "torch_dim", None) or getattr(module, "bnkit_torch_dim", None)
    if recorded in (1, 2, 3):
        return recorded
    info = describe_batchnorm(module)  # FrozenBatchNorm2d, timm's layers, registered classes
    return info.spatial_dims if info is not None else None


def _same_rank(module: nn.Module) -> bool:
    return isinstance(module, _SAME_RANK_MODULES) or is_batchnorm_like(module)


class _Tracer(fx.Tracer):
    """Keeps torch.nn leaves and the BatchNorm-like layers as leaves (never traces into them)."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _trace(root: nn.Module, leaves: set[int], training: bool) -> fx.Graph | None:
    flags = [(m, m.training) for m in root.modules()]
    try:
        for m, _ in flags:
            m.training = training or m.training
        return _Tracer(leaves).trace(root)
    except Exception:  # any model fx cannot trace is read by its parts or its neighbours
        return None
    finally:
        for m, flag in flags:
            m.training = flag


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = list(node.args)
    if args and isinstance(args[0], (list, tuple)):
        args = list(args[0]) + args[1:]
    return [a for a in args if isinstance(a, fx.Node)]


def _passes(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return _same_rank(root.get_submodule(node.target))
    if node.op == "call_function":
        return node.target in _SAME_RANK_FUNCTIONS
    return node.op == "call_method" and node.target in _SAME_RANK_METHODS


def _fixed(root: nn.Module, node: fx.Node) -> int | None:
    if node.op != "call_module":
        return None
    return module_dim(root.get_submodule(node.target))


def _producers(node: fx.Node) -> list[fx.Node]:
    # a module's rank is decided by its input; a function's or method's by any tensor argument
    return _tensor_args(node)[:1] if node.op == "call_module" else _tensor_args(node)


def _consumers(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _search(root: nn.Module, node: fx.Node, hops: int, step: Callable[[fx.Node], list[fx.Node]]) -> int | None:
    """The rank fixed by the nearest module ``step`` reaches from ``node`` (producers or consumers), through
    rank-preserving nodes, at most ``_MAX_HOPS`` away."""
    for other in step(node):
        found = _fixed(root, other)
        if found is None and hops < _MAX_HOPS and _passes(root, other):
            found = _search(root, other, hops + 1, step)
        if found is not None:
            return found
    return None


def _graph_dims(root: nn.Module, wanted: dict[int, nn.Module], dims: dict[int, int]) -> None:
    """Fill ``dims`` for the wanted layers reachable in ``root``'s fx graph; recurse into what fx cannot trace."""
    leaves = set(wanted)
    for training in (False, True):
        graph = _trace(root, leaves, training)
        if graph is None:
            break
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            module = root.get_submodule(node.target)
            if id(module) in wanted and id(module) not in dims:
                found = _search(root, node, 0, _producers) or _search(root, node, 0, _consumers)
                if found is not None:
                    dims[id(module)] = found
        if all(key in dims for key in wanted):
            return
    if graph is None:
        for child in root.children():
            if id(child) not in wanted and any(id(m) in wanted for m in child.modules()):
                _graph_dims(child, wanted, dims)


def _leaves(module: nn.Module) -> list[nn.Module]:
    if module_dim(module) is not None or _same_rank(module) or not list(module.children()):
        return [module]
    return [leaf for child in module.children() for leaf in _leaves(child)]


def _scan(modules: Iterable[nn.Module]) -> int | None:
    for module in modules:
        found = module_dim(module)
        if found is not None:
            return found
        if not _same_rank(module):
            return None
    return None


def _neighbour_dims(model: nn.Module, wanted: dict[int, nn.Module], dims: dict[int, int]) -> None:
    """In an ``nn.Sequential`` (where module order is data flow): the nearest module before the layer that fixes
    the rank, else the nearest one after it."""
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for index, child in enumerate(children):
            if id(child) not in wanted or id(child) in dims:
                continue
            before = [leaf for sibling in children[:index] for leaf in _leaves(sibling)]
            after = [leaf for sibling in children[index + 1 :] for leaf in _leaves(sibling)]
            found = _scan(reversed(before)) or _scan(after)
            if found is not None:
                dims[id(child)] = found


def infer_dims(model: nn.Module, modules: Iterable[nn.Module]) -> dict[int, int]:
    """``id(module) -> 1|2|3`` for those of ``modules`` whose rank the model's structure fixes (no forward run).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Flatten(), nn.SyncBatchNorm(16))
        >>> list(infer_dims(model, [model[1], model[3]]).values())
        [2]
    """
    wanted = {id(m): m for m in modules}
    dims: dict[int, int] = {}
    if not wanted:
        return dims
    if id(model) not in wanted:
        _graph_dims(model, wanted, dims)
    _neighbour_dims(model, {k: v for k, v in wanted.items() if k not in dims}, dims)
    return dims


def recorded_ranks(model: nn.Module, modules: Iterable[nn.Module], example_inputs: Any) -> dict[int, int]:
    """Run ``model`` once in eval mode without gradients; ``id(module) -> input rank`` for those reached.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2))
        >>> list(recorded_ranks(model, [model[0]], torch.zeros(1, 2, 5)).values())
        [3]
    """
    from bnkit.tools.model_inputs import call_with_example, eval_run

    ranks: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(module), args[0].ndim)

    with eval_run(model) as handles:
        handles.extend(m.register_forward_pre_hook(hook) for m in modules)
        call_with_example(model, example_inputs)
    return ranks
