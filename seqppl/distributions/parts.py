"""The parts of an EBM: each a sequence reward that answers for itself.

An EBM's reward is a sum over its parts, ``R(x, y) = Σ_i scale_i · R_i(x, y)``; a part's scale
is None (1, no multiplication at all) until ``scaled`` gives it one, a hard part (a constraint,
0 or −∞) is never scaled, and scaling keeps −∞ at −∞. Each part is a frozen pytree
(tables, parameters, scales and nested ARMs are data; lattices and functions are static) and
answers:

- ``score(tokens, prompt, space)``: its unscaled ``R_i`` ``[...]`` on well-formed int32 tokens;
- ``batch_shape``: the batch it contributes (a batch of tables, a nested distribution's);
- ``lattice``: the lattice on which it has local rewards, or None;
- ``local_rewards()``: that table, ``[S, A]``, ``[T, S, A]`` or ``[*B, T, S, A]`` (unscaled);
- ``params`` / ``with_params``, and ``scaled(beta)``.

A new kind of reward is a new class here with these members; the EBM needs no change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from seqppl.bellman import path_rewards
from seqppl.checks import refuse_invalid
from seqppl.lattice import Lattice
from seqppl.logspace import logsumexp
from seqppl.tables import table_batch_shape

__all__ = [
    "RewardTable",
    "Constraint",
    "ReferenceLogProb",
    "PathRewards",
    "RewardFunction",
    "weighted",
]


def weighted(scale, reward) -> jax.Array:
    """``scale · reward``, −∞ (a hard constraint) kept at −∞ whatever the scale."""
    hard = reward == -jnp.inf
    return jnp.where(hard, -jnp.inf, scale * jnp.where(hard, 0, reward))


class _Scaled:
    """Members shared by the soft parts, which carry a ``scale`` (None: 1, nothing to multiply;
    data, so that ``β`` of a tilt stays differentiable)."""

    hard = False

    def scaled(self, beta):
        """This part with its reward multiplied by ``beta``."""
        return dataclasses.replace(self, scale=beta if self.scale is None else beta * self.scale)

    def weighted_score(self, tokens, prompt, space) -> jax.Array:
        """``scale · R_i`` ``[...]`` (−∞ kept)."""
        return self.weighted(self.score(tokens, prompt, space))

    def weighted(self, values) -> jax.Array:
        """``scale · values`` (−∞ kept), or ``values`` unchanged when the scale is None."""
        return values if self.scale is None else weighted(self.scale, values)


class _OnLattice:
    """Members shared by the parts that are a ``table`` on a ``lattice``."""

    @property
    def params(self):
        """The table."""
        return self.table

    def with_params(self, table):
        """The part with another table (unchecked)."""
        return dataclasses.replace(self, table=table)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """``B`` of a batch of tables."""
        return table_batch_shape(self.table)

    def score(self, tokens, prompt, space) -> jax.Array:
        """``Σ_t r[t, s_t, y_t]`` ``[...]``."""
        return self.lattice.path_scores(self.table, tokens, prompt, trusted=True).sum(-1)

    def local_rewards(self) -> jax.Array:
        """The table itself."""
        return self.table


@dataclasses.dataclass(frozen=True, eq=False)
class RewardTable(_OnLattice, _Scaled):
    """Local rewards ``r`` on a lattice: ``R_i = Σ_t r[t, s_t, y_t]``."""

    table: jax.Array
    lattice: Lattice
    scale: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint(_OnLattice):
    """A hard constraint: a 0/−∞ table on a DFA (acceptance, ``Lattice.accepting_rewards``),
    never scaled."""

    table: jax.Array
    lattice: Lattice
    hard = True
    scale = None

    def scaled(self, beta):
        """A constraint stays hard: itself."""
        return self

    def weighted_score(self, tokens, prompt, space) -> jax.Array:
        """``R_i`` itself (0 or −∞)."""
        return self.score(tokens, prompt, space)

    def weighted(self, values) -> jax.Array:
        """``values`` unchanged: a constraint is never scaled."""
        return values


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceLogProb(_Scaled):
    """A reference ARM's ``log p_ref(y)`` (the base of a tilt); a table when the ARM is one."""

    arm: Any
    scale: Any = None

    @property
    def params(self):
        """The ARM itself (its tables or parameters train with it)."""
        return self.arm

    def with_params(self, arm):
        """The part with another ARM."""
        return dataclasses.replace(self, arm=arm)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The ARM's batch shape."""
        return self.arm.batch_shape

    @property
    def lattice(self) -> Lattice | None:
        """The ARM's lattice (None for a callable ARM)."""
        return self.arm.lattice

    def score(self, tokens, prompt, space) -> jax.Array:
        """``log p_ref(y)`` ``[...]``."""
        return self.arm.log_prob(tokens)

    def local_rewards(self) -> jax.Array:
        """``log π_ref[t, s, a]`` ``[*B, T, S, A]``."""
        return self.arm.log_policy_table()


@dataclasses.dataclass(frozen=True, eq=False)
class PathRewards(_Scaled):
    """The path-wise M⁻¹ of a callable ARM: ``R_i = Σ_t q_t(y_t) − [y_t ≠ EOS] V_q(s_{t+1})
    = log p_q(y) + V_q(x)``, so the EBM is the ARM and ``log Z = V_q(x)``."""

    arm: Any
    scale: Any = None
    lattice = None

    @property
    def params(self):
        """The ARM itself."""
        return self.arm

    def with_params(self, arm):
        """The part with another ARM."""
        return dataclasses.replace(self, arm=arm)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The ARM's batch shape."""
        return self.arm.batch_shape

    def score(self, tokens, prompt, space) -> jax.Array:
        """``Σ_t r_t`` ``[...]`` from one logits evaluation."""
        return path_rewards(self.arm.logits(tokens), tokens, space).sum(-1)

    def root_value(self, space, batch_shape) -> jax.Array:
        """``V_q(x) = logsumexp_a q(x, a)`` ``[*batch]``: the ARM's root soft value, which is
        ``log Z`` of the unscaled part."""
        fill = space.eos_id if space.eos else 0
        tokens = jnp.full((*batch_shape, space.horizon), fill, jnp.int32)
        return logsumexp(space.mask_logits(self.arm.logits(tokens))[..., 0, :], -1)


@dataclasses.dataclass(frozen=True, eq=False)
class RewardFunction(_Scaled):
    """A user ``reward_fn(tokens [..., T]) -> R [...]`` (``reward_fn(params, tokens)`` with
    ``params``; ``prompt=`` with a prompt). Eager outputs with NaN or +∞ are refused."""

    fn: Any
    params: Any = None
    scale: Any = None
    lattice = None
    batch_shape = ()

    def with_params(self, params):
        """The part with other parameters."""
        return dataclasses.replace(self, params=params)

    def score(self, tokens, prompt, space) -> jax.Array:
        """``reward_fn``'s output ``[...]``, checked for shape and (eagerly) NaN/+∞."""
        args = (tokens,) if self.params is None else (self.params, tokens)
        out = jnp.asarray(self.fn(*args) if prompt is None else self.fn(*args, prompt=prompt))
        if out.shape != tokens.shape[:-1]:
            raise ValueError(f"reward_fn must return shape {tokens.shape[:-1]}, got {out.shape}")
        refuse_invalid(out, "reward_fn(tokens)", rows=tokens)
        return out


for _cls, _data, _meta in (
    (RewardTable, ["table", "scale"], ["lattice"]),
    (Constraint, ["table"], ["lattice"]),
    (ReferenceLogProb, ["arm", "scale"], []),
    (PathRewards, ["arm", "scale"], []),
    (RewardFunction, ["params", "scale"], ["fn"]),
):
    jax.tree_util.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)
