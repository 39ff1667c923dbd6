"""Which BatchNormalization layers :func:`bnkit.keras.fold` folds, into which layer, and why the others stay.

The plan is read from the graph of each Sequential or functional container (nested ones included, each once),
in call order. Keras keeps that graph in private attributes (``_nodes_by_depth``, a Sequential model's
``_functional``), read by :func:`bnkit.keras.compat.functional_graph`; :func:`read_graph` reads the nodes
(``Node.operation``, ``input_tensors``, ``outputs``, ``arguments``), and a Keras release that moves any of them
gives a one-line error naming this module instead of a wrong fold.

Rules, per BatchNormalization call (paths are ``/``-joined layer names, as everywhere in bnkit.keras):

- The BN is stock Keras (or ``bnkit.keras.BatchNormalization``, the same map in inference), called once in its
  container, and not recorded with ``training=True`` at construction, on itself or on a container's call (a
  plain ``model(x)`` would then use batch statistics; ``predict`` overrides it).
- AFTER: its input comes from a Conv1D/2D/3D (any groups), DepthwiseConv1D/2D, SeparableConv1D/2D,
  Conv1D/2D/3DTranspose or Dense layer (or from a BN already folded into one) that is called once, has no
  activation of its own (it would sit between the layer and the BN), whose output feeds nothing else, and whose
  channel axis is the BN's axis.
- BEFORE, tried when AFTER fails: the BN's output feeds exactly one layer, of the kinds above except the
  transposed convolutions, called once, with ``padding="valid"`` (zero padding would see 0 where the folded
  layer expects the BN's shift), channel axis = the BN's axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnkit.keras import compat
from bnkit.keras.fold_weights import layer_kind

__all__ = ["Call", "Fold", "Graph", "Plan", "is_graph_model", "plan_model", "read_graph"]

_ACTIVATIONS = ("ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "Activation")


@dataclass
class Call:
    """One call of a layer in a container's graph.

    Attributes:
        layer: The layer (or operation) called.
        inputs: ``id`` of each input tensor.
        outputs: ``id`` of each output tensor.
        rank: Rank of the first input (None when unknown).
        training: The ``training=`` recorded at construction, or None.

    Example:
        >>> Call("layer", [1], [2], 4).rank
        4
    """

    layer: Any
    inputs: list[int]
    outputs: list[int]
    rank: int | None = None
    training: Any = None


@dataclass
class Graph:
    """A container's calls in call order, with who produces and who consumes each tensor.

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")])
        >>> [c.layer.name for c in read_graph(m).calls]
        ['d']
    """

    calls: list[Call]
    outputs: set[int]
    producer: dict[int, Call] = field(default_factory=dict)
    consumers: dict[int, list[Call]] = field(default_factory=dict)
    times: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for call in self.calls:
            self.times[id(call.layer)] = self.times.get(id(call.layer), 0) + 1
            for tensor in call.outputs:
                self.producer[tensor] = call
            for tensor in call.inputs:
                self.consumers.setdefault(tensor, []).append(call)


@dataclass
class Fold:
    """One planned fold.

    Example:
        >>> Fold("bn", "conv", "after", None, None, "conv").position
        'after'
    """

    bn: str
    into: str
    position: str
    bn_layer: Any
    layer: Any
    kind: str


@dataclass
class Plan:
    """The folds (in the order they apply) and the BNs left, path -> reason.

    Example:
        >>> Plan().folds, Plan().skipped
        ([], {})
    """

    folds: list[Fold] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def is_graph_model(layer: Any) -> bool:
    """True for a Sequential or functional model (one whose graph fold can rebuild).

    Example:
        >>> keras = compat.import_keras()
        >>> is_graph_model(keras.Sequential()), is_graph_model(keras.layers.Dense(2))
        (True, False)
    """
    keras = compat.import_keras()
    return isinstance(layer, keras.Sequential) or (
        compat.is_model(layer) and compat.functional_graph(layer) is not None
    )


def read_graph(model: Any) -> Graph:
    """The graph of a Sequential or functional model (private Keras attributes; see the module docstring).

    Raises:
        ValueError: the model is not built, or this Keras keeps its graph elsewhere.

    Example:
        >>> keras = compat.import_keras()
        >>> inp = keras.Input((3,)); d = keras.layers.Dense(3, name="d")
        >>> g = read_graph(keras.Model(inp, d(d(inp))))
        >>> len(g.calls), g.times[id(d)]
        (2, 2)
    """
    keras = compat.import_keras()
    graph = compat.functional_graph(model)
    if graph is None:
        raise ValueError(
            f"bnkit.keras.fold: cannot read the graph of {model.name} ({type(model).__name__}); build it with a "
            "keras.Input first (bnkit/keras/fold_plan.py reads Keras's private graph attributes)"
        )
    nodes, output_tensors = graph
    calls = []
    try:
        for node in nodes:
            if node.operation is None or node.is_input:
                continue
            inputs = list(node.input_tensors)
            rank = len(inputs[0].shape) if inputs and getattr(inputs[0], "shape", None) is not None else None
            kwargs = getattr(node.arguments, "kwargs", None) or {}
            training = kwargs.get("training")
            calls.append(Call(node.operation, [id(t) for t in inputs], [id(t) for t in node.outputs], rank, training))
        outputs = {id(t) for t in output_tensors}
    except AttributeError as error:
        raise ValueError(
            f"bnkit.keras.fold: this Keras ({keras.__version__}) keeps its graph differently ({error}); "
            "bnkit/keras/fold_plan.py needs an update"
        ) from None
    return Graph(calls, outputs)


def _channel_axis(layer: Any, rank: int) -> int:
    if layer_kind(layer) == "dense":
        return rank - 1
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def _bn_axis(bn: Any, rank: int | None) -> int | None:
    axis = bn.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return None
        axis = axis[0]
    return None if rank is None else int(axis) % rank


def _out_channels(layer: Any, kind: str) -> int:
    if kind == "separable":
        return int(layer.pointwise_kernel.shape[-1])
    if kind == "depthwise":
        return int(layer.kernel.shape[-2] * layer.kernel.shape[-1])
    if kind == "transpose":
        return int(layer.kernel.shape[-2])
    return int(layer.kernel.shape[-1])


def _in_channels(layer: Any, kind: str) -> int:
    if kind == "separable":
        return int(layer.depthwise_kernel.shape[-2])
    if kind == "depthwise":
        return int(layer.kernel.shape[-2])
    if kind == "dense":
        return int(layer.kernel.shape[0])
    return int(layer.kernel.shape[-2]) * int(getattr(layer, "groups", 1) or 1)


def _unsupported_weights(layer: Any) -> str:
    if getattr(layer, "lora_enabled", False):
        return f"{layer.name} has LoRA enabled (its kernel is a sum of variables)"
    if getattr(layer, "quantization_mode", None):
        return f"{layer.name} is quantized ({layer.quantization_mode})"
    if not layer.built:
        return f"{layer.name} is not built"
    return ""


def _describe(layer: Any) -> str:
    return f"{layer.name} ({type(layer).__name__})"


class _Planner:
    """Plans one container; nested containers get their own planner."""

    def __init__(
        self, model: Any, prefix: str, plan: Plan, seen: set[int], times: dict[int, int], training: Any = None
    ) -> None:
        self.model, self.prefix, self.plan, self.seen, self.times = model, prefix, plan, seen, times
        self.training = training  # recorded on the call of this container in the one above (the outermost wins)
        self.graph = read_graph(model)
        self.folded_into: dict[int, Call] = {}  # id(BN call) -> call of the layer it was folded into (after)

    def run(self) -> None:
        for call in self.graph.calls:
            layer = call.layer
            if is_graph_model(layer) and id(layer) not in self.seen:
                self.seen.add(id(layer))
                training = self.training if self.training is not None else call.training
                _Planner(layer, f"{self.prefix}{layer.name}/", self.plan, self.seen, self.times, training).run()
            elif compat.is_batchnorm(layer):
                self._batchnorm(call)

    def _path(self, layer: Any) -> str:
        return f"{self.prefix}{layer.name}"

    def _batchnorm(self, call: Call) -> None:
        bn, path = call.layer, self._path(call.layer)
        if path in self.plan.skipped or any(f.bn == path for f in self.plan.folds):
            return  # a shared BN: decided at its first call
        reason = self._bn_itself(call)
        if reason:
            self.plan.skipped[path] = reason
            return
        target, after_reason = self._after(call)
        if target is not None:
            self.folded_into[id(call)] = target
            self._record(bn, target.layer, "after")
            return
        target, before_reason = self._before(call)
        if target is not None:
            self._record(bn, target.layer, "before")
            return
        self.plan.skipped[path] = f"{after_reason}; {before_reason}"

    def _record(self, bn: Any, layer: Any, position: str) -> None:
        kind = layer_kind(layer)
        assert kind is not None
        self.plan.folds.append(Fold(self._path(bn), self._path(layer), position, bn, layer, kind))

    def _bn_itself(self, call: Call) -> str:
        bn = call.layer
        times = self.times[id(bn)]
        if times > 1:
            return f"shared layer: {bn.name} is called {times} times (one fold cannot serve every call)"
        keras = compat.import_keras()
        from bnkit.keras.layer import BatchNormalization

        if type(bn).call not in (keras.layers.BatchNormalization.call, BatchNormalization.call):
            return f"{type(bn).__name__} overrides call(): its inference map is not known to be the stock one"
        training = self.training if self.training is not None else call.training
        if training is True and bn.trainable and not getattr(bn, "freeze_stats", False):
            return (
                "called with training=True when the model was built: a plain model(x) call normalises with batch "
                "statistics (predict() does not), which the folded model cannot do"
            )
        if not bn.built:
            return f"{bn.name} is not built"
        if _bn_axis(bn, call.rank) is None:
            return f"axis={bn.axis!r}: only one channel axis can be folded"
        return ""

    def _after(self, call: Call) -> tuple[Call | None, str]:
        bn = call.layer
        producer = self.graph.producer.get(call.inputs[0]) if call.inputs else None
        while producer is not None and id(producer) in self.folded_into:
            producer = self.folded_into[id(producer)]  # a BN already folded: fold into its layer too
        if producer is None:
            return None, "after: its input is a model input"
        layer = producer.layer
        kind = layer_kind(layer)
        if kind is None:
            if type(layer).__name__ in _ACTIVATIONS:
                return None, f"activation between: its input comes from {_describe(layer)}"
            if compat.is_model(layer):
                return None, f"after: its input comes from the nested model {layer.name} (no fold across models)"
            return None, f"after: its input comes from {_describe(layer)}, which has no kernel to fold into"
        activation = getattr(getattr(layer, "activation", None), "__name__", "linear")
        if activation != "linear":
            return None, f"activation between: {layer.name} applies activation={activation!r} before the BN"
        times = self.times[id(layer)]
        if times > 1:
            return None, f"shared layer: {layer.name} is called {times} times"
        problem = _unsupported_weights(layer)
        if problem:
            return None, f"after: {problem}"
        direct = call.inputs[0]  # the layer's output, or that of a BN already folded into it (checked then)
        others = [c.layer.name for c in self.graph.consumers.get(direct, []) if c is not call]
        if direct in self.graph.outputs:
            others.append("the model output")
        if others:
            source = self.graph.producer[direct].layer.name
            return None, f"several consumers: {source}'s output also feeds {', '.join(others)}"
        axis, channel = _bn_axis(bn, call.rank), _channel_axis(layer, call.rank or 0)
        if axis != channel:
            return None, f"after: the BN normalises axis {axis}, {layer.name}'s channels are on axis {channel}"
        if _out_channels(layer, kind) != int(bn.moving_mean.shape[0]):
            return (
                None,
                f"after: {layer.name} has {_out_channels(layer, kind)} channels, the BN {bn.moving_mean.shape[0]}",
            )
        return producer, ""

    def _before(self, call: Call) -> tuple[Call | None, str]:
        bn = call.layer
        tensor = call.outputs[0]
        consumers = self.graph.consumers.get(tensor, [])
        names = [c.layer.name for c in consumers] + (["the model output"] if tensor in self.graph.outputs else [])
        if not consumers:
            return None, "before: its output is the model output" if names else "before: its output feeds nothing"
        if len(names) > 1:
            return None, f"several consumers: its output feeds {', '.join(names)}"
        consumer = consumers[0]
        layer = consumer.layer
        kind = layer_kind(layer)
        if kind is None:
            return None, f"before: it feeds {_describe(layer)}, which has no kernel to fold into"
        if kind == "transpose":
            return None, f"before: {layer.name} is a transposed convolution (its border outputs get fewer taps)"
        times = self.times[id(layer)]
        if times > 1:
            return None, f"shared layer: {layer.name} is called {times} times"
        if len(consumer.inputs) != 1:
            return None, f"before: {layer.name} takes {len(consumer.inputs)} inputs"
        padding = getattr(layer, "padding", "valid")
        if kind != "dense" and padding != "valid":
            return None, (
                f"BN before a zero-padded conv: {layer.name} uses padding={padding!r}, whose zeros would not get "
                "the BN's shift (only padding='valid' folds exactly)"
            )
        problem = _unsupported_weights(layer)
        if problem:
            return None, f"before: {problem}"
        axis, channel = _bn_axis(bn, call.rank), _channel_axis(layer, call.rank or 0)
        if axis != channel:
            return None, f"before: the BN normalises axis {axis}, {layer.name} reads channels on axis {channel}"
        if _in_channels(layer, kind) != int(bn.moving_mean.shape[0]):
            return (
                None,
                f"before: {layer.name} reads {_in_channels(layer, kind)} channels, the BN {bn.moving_mean.shape[0]}",
            )
        return consumer, ""


def plan_model(model: Any) -> Plan:
    """The folds for a Sequential or functional ``model`` and its nested ones, and the BNs left with reasons.

    BNs that the graphs never reach (inside subclassed models or custom layers) are not listed here; the caller
    adds them (see :func:`bnkit.keras.fold`).

    Example:
        >>> keras = compat.import_keras()
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc"),
        ...                       keras.layers.BatchNormalization(name="bn")])
        >>> [(f.bn, f.into, f.position) for f in plan_model(m).folds]
        [('bn', 'fc', 'after')]
    """
    plan = Plan()
    _Planner(model, "", plan, {id(model)}, _calls_everywhere(model)).run()
    return plan


def _calls_everywhere(model: Any) -> dict[int, int]:
    """``id(layer) -> calls`` summed over ``model`` and every nested container (each container counted once)."""
    times: dict[int, int] = {}
    seen = {id(model)}
    pending = [model]
    while pending:
        graph = read_graph(pending.pop())
        for key, count in graph.times.items():
            times[key] = times.get(key, 0) + count
        for call in graph.calls:
            if is_graph_model(call.layer) and id(call.layer) not in seen:
                seen.add(id(call.layer))
                pending.append(call.layer)
    return times
