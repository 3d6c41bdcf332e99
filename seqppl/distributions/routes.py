"""Which exact computation an EBM has: the one answer every consumer asks.

``EBM.exact_route`` is decided once from the EBM's parts and space:

- ``DYNAMIC_PROGRAM``: every part has a table on a lattice; ``log Z``, ``M`` and exact sampling
  are one dynamic program on the product of their lattices;
- ``ARM``: the EBM is the path-wise M⁻¹ of one ARM (``to_ebm`` of a callable ARM): that ARM is
  the same distribution, its root soft value is ``log Z`` and it samples exactly;
- ``ENUMERATION``: the space is small enough (``MAX_ENUMERATE`` sequences) to score every
  sequence, in chunks;
- ``NONE``: no exact route; ``log Z`` needs an estimator and an ARM needs distillation.

A consumer that needs an exact route the EBM lacks raises ``NoExactRoute``; ``to_arm`` raises its
subclass ``NoExactARM``. Both are ``ValueError``s. ``AttachedLogZ`` is what
``EBM.with_log_partition`` puts in place of the exact ``log Z``: an estimate.
"""

from __future__ import annotations

import enum

import jax

__all__ = ["ExactRoute", "NoExactRoute", "NoExactARM", "AttachedLogZ"]


class ExactRoute(enum.Enum):
    """How an EBM's exact ``log Z``, samples and ARM are computed, if at all."""

    DYNAMIC_PROGRAM = "dynamic program"
    ARM = "arm"
    ENUMERATION = "enumeration"
    NONE = "none"

    @property
    def is_exact(self) -> bool:
        """True unless ``NONE``: exact ``log Z`` and exact samples are available."""
        return self is not ExactRoute.NONE


class NoExactRoute(ValueError):
    """The EBM has no exact route for what was asked; the message names the approximate one."""


class NoExactARM(NoExactRoute):
    """``to_arm`` has no exact route for this EBM (not a lattice, prefix tree too large)."""


class AttachedLogZ:
    """An estimate of ``log Z`` attached with ``EBM.with_log_partition`` (a pytree: ``log_z`` is
    data, the estimate it came from is kept as a static field, compared by identity)."""

    def __init__(self, log_z, estimate):
        self.log_z, self.estimate = log_z, estimate

    def tree_flatten(self):
        """``(log_z,)`` as data, the estimate as auxiliary data."""
        return (self.log_z,), _Identity(self.estimate)

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuilds the attachment."""
        return cls(children[0], aux.value)


class _Identity:
    """Auxiliary pytree data compared by identity (estimates hold arrays and dicts)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self):
        return id(self.value)


jax.tree_util.register_pytree_node_class(AttachedLogZ)
