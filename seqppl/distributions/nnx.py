"""Flax NNX modules as ARM logits or EBM reward functions: split into a graph and parameters.

``ARM.from_nnx(module, space)`` keeps the graph (static, an aux field) and the ``nnx.Param``
state as a pure nested dict (``nnx.to_pure_dict``, the form ``numpyro.contrib.module`` uses), so
the ARM's ``params`` can be trained by optax, registered with ``numpyro.param`` or sampled from a
prior (``seqppl.distributions.nnx_arm`` is the NumPyro primitive that registers them).

A module used as an ARM maps ``tokens [..., T] -> logits [..., T, A]`` causally (and takes the
keyword ``prompt=`` when the ARM has a prompt). If it also defines the cached-step protocol as
pure methods (the ``CachedLogits`` protocol), ``init(batch_shape, prompt=None) -> (logits
[*batch, A], cache)`` and ``step(cache, token [*batch]) -> (logits, cache)`` with ``cache`` a
pytree of arrays, sampling uses it (one step per decision instead of re-running the buffer).
"""

from __future__ import annotations

import jax
from flax import nnx

__all__ = ["NNXFunction", "module_params"]


def module_params(module: nnx.Module) -> dict:
    """The module's ``nnx.Param`` leaves as a pure nested dict (``nnx.to_pure_dict``)."""
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return nnx.to_pure_dict(params)


class NNXFunction:
    """``fn(params, tokens, prompt=...)`` (logits or reward) merging ``params`` into the graph.

    ``init`` and ``step`` exist exactly when the module defines them (the ``CachedLogits``
    protocol, checked when the ARM is built). Two wrappers are equal when they wrap the same
    graph and non-parameter state, which keeps ``jit`` caches valid across ``with_params``.
    """

    def __new__(cls, module: nnx.Module):
        if not isinstance(module, nnx.Module):
            raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
        cached = hasattr(module, "init") and hasattr(module, "step")
        return super().__new__(_CachedNNXFunction if cached else cls)

    def __init__(self, module: nnx.Module):
        self.graphdef, self._template, self._rest = nnx.split(module, nnx.Param, ...)

    def merge(self, params) -> nnx.Module:
        """A fresh module with ``params`` (a pure dict shaped like ``module_params``)."""
        state = jax.tree.map(lambda leaf: leaf, self._template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self._rest, copy=True)

    def __call__(self, params, tokens, **kwargs):
        return self.merge(params)(tokens, **kwargs)

    def __eq__(self, other):
        return (
            type(other) is type(self)
            and other.graphdef == self.graphdef
            and other._rest is self._rest
        )

    def __hash__(self):
        return hash((type(self), self.graphdef))


class _CachedNNXFunction(NNXFunction):
    def init(self, params, batch_shape, **kwargs):
        return self.merge(params).init(batch_shape, **kwargs)

    def step(self, params, cache, token):
        return self.merge(params).step(cache, token)
