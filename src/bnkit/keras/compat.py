"""Everything bnkit.keras asks of Keras that is not its documented public API, probed at run time.

Keras is imported here on first use (never at ``import bnkit``: Keras reads ``KERAS_BACKEND`` when imported).
Private attributes (``_flatten_layers``, ``_inbound_nodes``, ``_nodes_by_depth``, a Sequential model's
``_functional``, node arguments, the JAX trainer's ``_jax_state``) are read only in this module, each with a
fallback, so a Keras release that moves them degrades one answer instead of breaking every tool.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "backend",
    "construction_training",
    "functional_graph",
    "import_keras",
    "is_batchnorm",
    "is_model",
    "jax_fit_state",
    "sublayers",
]


def import_keras() -> Any:
    """The ``keras`` module (Keras 3), or a one-line error naming the extra to install.

    Example:
        >>> import_keras().__version__[0]
        '3'
    """
    try:
        import keras
    except ModuleNotFoundError:
        raise ModuleNotFoundError("bnkit.keras needs Keras 3: pip install 'bnkit[keras]'", name="keras") from None
    if not keras.__version__.startswith("3"):
        raise ImportError(f"bnkit.keras needs Keras 3, found keras {keras.__version__}: pip install 'keras>=3.8'")
    return keras


def backend() -> str:
    """The running Keras backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``.

    Example:
        >>> backend() in {"tensorflow", "jax", "torch", "numpy", "openvino"}
        True
    """
    return str(import_keras().backend.backend())


def is_batchnorm(layer: Any) -> bool:
    """True for ``keras.layers.BatchNormalization`` and its subclasses (bnkit's included).

    Example:
        >>> keras = import_keras()
        >>> is_batchnorm(keras.layers.BatchNormalization()), is_batchnorm(keras.layers.Dense(2))
        (True, False)
    """
    return isinstance(layer, import_keras().layers.BatchNormalization)


def is_model(obj: Any) -> bool:
    """True for a ``keras.Model`` (Sequential, functional or subclassed).

    Example:
        >>> is_model(import_keras().Sequential()), is_model(3)
        (True, False)
    """
    return isinstance(obj, import_keras().Model)


def sublayers(layer: Any) -> list[Any]:
    """The layers directly inside ``layer`` (a model or a layer that holds layers), in tracking order.

    Input layers are left out (they hold no state and take no ``training``).

    Example:
        >>> keras = import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")])
        >>> [l.name for l in sublayers(m)]
        ['d']
    """
    input_layer = import_keras().layers.InputLayer
    found: list[Any] | None = None
    flatten = getattr(layer, "_flatten_layers", None)
    if callable(flatten):
        try:
            found = list(flatten(include_self=False, recursive=False))
        except TypeError:  # a release with another signature
            found = None
    if found is None:
        found = list(getattr(layer, "layers", []) or [])
    return [sub for sub in found if not isinstance(sub, input_layer)]


def construction_training(model: Any, layer: Any) -> bool | None:
    """The ``training=`` that ``layer`` was called with when the functional ``model`` was built, if any.

    ``x = base(inputs, training=False)`` in a functional model records ``training=False`` on the node; ``fit()``
    ignores it (keras#20285). Returns None when no such argument was recorded.

    Example:
        >>> keras = import_keras()
        >>> inp = keras.Input((2,)); bn = keras.layers.BatchNormalization()
        >>> model = keras.Model(inp, bn(inp, training=False))
        >>> construction_training(model, bn)
        False
    """
    found: bool | None = None
    for node in _nodes_in(model, layer):
        arguments = getattr(node, "arguments", None)
        kwargs = getattr(arguments, "kwargs", None) or {}
        if "training" in kwargs and kwargs["training"] is not None:
            found = bool(kwargs["training"])
    return found


def _nodes_in(model: Any, layer: Any) -> list[Any]:
    nodes = getattr(layer, "_inbound_nodes", None) or []
    by_depth = getattr(model, "_nodes_by_depth", None)
    if isinstance(by_depth, dict):
        own = {id(n) for depth in by_depth.values() for n in depth}
        return [n for n in nodes if id(n) in own] or list(nodes)
    return list(nodes)


@functools.cache
def variance_is_one_pass() -> bool:
    """Whether this backend's BatchNormalization computes the batch variance as E[x^2]-E[x]^2 (probed once).

    Probed on inputs with mean 1000 and std 0.05: the one-pass formula loses the variance entirely in float32.

    Example:
        >>> isinstance(variance_is_one_pass(), bool)
        True
    """
    import numpy as np

    keras = import_keras()
    bn = keras.layers.BatchNormalization(momentum=0.0)
    x = (1000.0 + 0.05 * np.random.default_rng(0).standard_normal((64, 4))).astype("float32")
    bn(x, training=True)
    var = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance))
    return bool(np.any(np.abs(var - x.astype("float64").var(axis=0)) > 1e-3))


def is_compiled(model: Any) -> bool:
    """Whether ``model.compile()`` has been called (Keras 3 sets ``model.compiled``).

    Example:
        >>> keras = import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> is_compiled(m), (m.compile("sgd", "mse"), is_compiled(m))[1]
        (False, True)
    """
    return bool(getattr(model, "compiled", False))


#: What happens on each backend when ``trainable`` changes after ``compile()`` and ``fit()`` runs without a new
#: ``compile()`` (measured with Keras 3.15; see docs/keras.md).
RECOMPILE_CONSEQUENCE: dict[str, str] = {
    "tensorflow": "on TensorFlow fit() keeps the train function compiled before the change and silently trains "
    "what it trained before",
    "torch": "on torch fit() raises 'ValueError: Unknown variable' after the forward pass has already moved the "
    "BatchNorm statistics",
    "jax": "on JAX fit() raises ValueError and leaves the model unusable (reading weights and recompiling fail)",
}


def recompile_consequence() -> str:
    """This backend's consequence of changing ``trainable`` without calling ``compile()`` again.

    Example:
        >>> recompile_consequence().startswith("on ")
        True
    """
    name = backend()
    return RECOMPILE_CONSEQUENCE.get(name, f"on {name} fit() may keep using the old trainable set")


def compiled_trainable_state(model: Any) -> dict[int, bool] | None:
    """``id(layer) -> trainable`` as it was when ``model.compile()`` last ran, or None when unknown.

    Keras 3 keeps this in the private ``_compiled_trainable_state``; read only here.

    Example:
        >>> keras = import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> compiled_trainable_state(m) is None
        True
    """
    if not is_compiled(model):
        return None
    state = getattr(model, "_compiled_trainable_state", None)
    if not isinstance(state, dict):
        return None
    return {id(layer): bool(flag) for layer, flag in state.items()}


def to_numpy(variable: Any) -> Any:
    """A NumPy copy of a Keras variable or tensor on any backend.

    Example:
        >>> to_numpy(import_keras().Variable([1.0, 2.0])).tolist()
        [1.0, 2.0]
    """
    import numpy as np

    return np.array(import_keras().ops.convert_to_numpy(variable), copy=True)


def producers(layer: Any) -> list[Any]:
    """The layers whose outputs feed ``layer`` in the graphs it was called in (functional and Sequential models).

    Reads each node's input tensors' ``_keras_history`` (private; empty list when absent).

    Example:
        >>> keras = import_keras()
        >>> dense = keras.layers.Dense(2, name="fc"); bn = keras.layers.BatchNormalization()
        >>> m = keras.Sequential([keras.Input((3,)), dense, bn])
        >>> [p.name for p in producers(bn)]
        ['fc']
    """
    found: list[Any] = []
    for node in getattr(layer, "_inbound_nodes", None) or []:
        arguments = getattr(node, "arguments", None)
        for tensor in getattr(arguments, "keras_tensors", None) or []:
            history = getattr(tensor, "_keras_history", None)
            operation = getattr(history, "operation", None)
            if operation is not None and all(operation is not p for p in found):
                found.append(operation)
    return found


def optimizer_steps(model: Any) -> int | None:
    """Training steps the model's optimizer has taken (``optimizer.iterations``), or None without an optimizer.

    Example:
        >>> keras = import_keras()
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> optimizer_steps(m) is None
        True
    """
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None:
        return None
    return int(to_numpy(iterations))


def functional_graph(model: Any) -> tuple[list[Any], list[Any]] | None:
    """The call nodes of a Sequential or functional ``model`` in call order and its output tensors, or None.

    Reads ``_nodes_by_depth`` (a Sequential model's, on its ``_functional``); None when the model has no graph
    (a subclassed model, a Sequential model never built with an input) or this Keras keeps it elsewhere. The
    nodes are Keras's ``Node`` objects (``operation``, ``is_input``, ``input_tensors``, ``outputs``,
    ``arguments``).

    Example:
        >>> keras = import_keras()
        >>> inp = keras.Input((3,)); d = keras.layers.Dense(3, name="d")
        >>> nodes, outputs = functional_graph(keras.Model(inp, d(d(inp))))
        >>> [n.operation.name for n in nodes if not n.is_input], len(outputs)
        (['d', 'd'], 1)
        >>> functional_graph(keras.layers.Dense(2)) is None
        True
    """
    keras = import_keras()
    source = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    by_depth = getattr(source, "_nodes_by_depth", None)
    outputs = getattr(source, "outputs", None)
    if not isinstance(by_depth, dict) or outputs is None:
        return None
    nodes = [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]
    return nodes, list(outputs)


def jax_fit_state(model: Any) -> dict[str, Any] | None:
    """The variable values JAX's ``fit()`` holds between steps (``model._jax_state``) while they are newer than the
    variables, else None (other backends, outside ``fit()``, or once Keras has written them back).

    Example:
        >>> keras = import_keras()
        >>> jax_fit_state(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])) is None
        True
    """
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True):
        return None
    return state
