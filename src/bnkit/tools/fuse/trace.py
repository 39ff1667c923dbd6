"""Looking at a model before folding: its ``torch.fx`` graph (untraceable submodules made opaque) and one eval
run on the example inputs that records the rank each layer and BatchNorm sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from bnkit.tools.fuse.norms import norm_view
from bnkit.tools.model_inputs import ExampleInputs, call_with_example

__all__ = ["CONVS", "LAYERS", "RecordedRun", "TraceFailure", "Tracer", "fresh", "run_recording", "trace"]

CONVS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: The layers a BatchNorm folds into.
LAYERS: tuple[type[nn.Module], ...] = (*CONVS, nn.Linear)


def is_leaf_kind(module: nn.Module) -> bool:
    """Layers and BatchNorm-like modules: kept whole in the graph (fuse reasons about them as units).

    Example:
        >>> is_leaf_kind(nn.Conv2d(1, 1, 1)), is_leaf_kind(nn.ReLU())
        (True, False)
    """
    return isinstance(module, LAYERS) or norm_view(module) is not None


# ---------------------------------------------------------------------------------------------- fx


class TraceFailure(Exception):
    """fx tracing failed in the root's own forward (no submodule to make opaque was left).

    Example:
        >>> TraceFailure(RuntimeError("data-dependent control flow")).error
        RuntimeError('data-dependent control flow')
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Tracer(fx.Tracer):
    """fx tracer that keeps layers, BatchNorms and known-untraceable modules as leaves and names a failure.

    Example:
        >>> graph = Tracer(set()).trace(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
        >>> [node.op for node in graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque
        self.culprit: int | None = None
        self.stack: list[nn.Module] = []
        self.kinds: set[int] = set()

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:  # type: ignore[override]
        # Decided before tracing: while fx traces, reading a module's tensors records get_attr nodes.
        self.kinds = {id(m) for m in root.modules() if is_leaf_kind(m)}
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque or id(m) in self.kinds:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.stack.append(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.culprit is None:
                # The innermost module being traced through when the error surfaced; never a leaf, since
                # marking a leaf opaque would change nothing.
                for candidate in reversed(self.stack):
                    try:
                        name = self.path_of_module(candidate)
                    except Exception:  # module created inside forward: blame its caller
                        continue
                    if not self.is_leaf_module(candidate, name):
                        self.culprit = id(candidate)
                        break
            raise
        finally:
            self.stack.pop()


def trace(module: nn.Module, opaque: set[int]) -> fx.Graph:
    """Trace ``module``, growing ``opaque`` with each submodule that fails until the rest traces.

    Raises:
        TraceFailure: the failure is in ``module``'s own forward.

    Example:
        >>> class Branchy(nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
        >>> opaque = set()
        >>> graph = trace(nn.Sequential(Branchy(), nn.BatchNorm1d(2)), opaque)
        >>> [node.op for node in graph.nodes], len(opaque)
        (['placeholder', 'call_module', 'call_module', 'output'], 1)
    """
    for _ in range(sum(1 for _ in module.modules()) + 1):
        tracer = Tracer(opaque)
        try:
            return tracer.trace(module)
        except Exception as error:  # fx raises many kinds
            if tracer.culprit is None or tracer.culprit == id(module) or tracer.culprit in opaque:
                raise TraceFailure(error) from None
            opaque.add(tracer.culprit)
    raise TraceFailure(RuntimeError("tracing did not converge"))


# ---------------------------------------------------------------------------------------------- eval run


def fresh(example_inputs: ExampleInputs) -> ExampleInputs:
    """A copy of ``example_inputs`` with every tensor cloned (same containers), so an in-place first layer
    cannot change the inputs between runs; a callable is returned as is.

    Example:
        >>> x = torch.zeros(1)
        >>> copied = fresh([x, {"y": x}])
        >>> copied[0] is x, torch.equal(copied[1]["y"], x)
        (False, True)
    """
    from torch.utils._pytree import tree_map

    return tree_map(lambda value: value.clone() if isinstance(value, Tensor) else value, example_inputs)


@dataclass
class RecordedRun:
    """One eval run of the model: its output and the input rank of each layer and BatchNorm call, by name.

    Example:
        >>> RecordedRun(None, {"bn": [4, 4], "fc": [2, 3]}).rank("bn"), RecordedRun(None, {"fc": [2, 3]}).rank("fc")
        (4, None)
    """

    output: Any
    ranks: dict[str, list[int]] = field(default_factory=dict)

    def rank(self, name: str) -> int | None:
        """The one rank ``name`` saw; None when it was not called or saw several."""
        seen = set(self.ranks.get(name, []))
        return seen.pop() if len(seen) == 1 else None


def run_recording(model: nn.Module, example_inputs: ExampleInputs) -> RecordedRun:
    """Call ``model`` on (a copy of) ``example_inputs`` without gradient, recording the rank of the first input
    of every layer and BatchNorm call.

    Example:
        >>> run = run_recording(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval(), torch.zeros(5, 3))
        >>> run.ranks, tuple(run.output.shape)
        ({'0': [2], '1': [2]}, (5, 2))
    """
    handles = []
    run = RecordedRun(output=None)

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                run.ranks.setdefault(name, []).append(inputs[0].ndim)

        return record

    for name, module in model.named_modules():
        if is_leaf_kind(module):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run.output = call_with_example(model, fresh(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return run
