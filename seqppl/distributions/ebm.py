"""EBM: an energy-based model ``p_R(y | x) = exp(R(x, y) − A(x))`` as a NumPyro distribution.

An EBM is a sum of parts, each a sequence reward: a local-reward table on a lattice, an ARM's
``log p`` (a tilt's reference), a user ``reward_fn``, a DFA constraint (0 or −∞, never scaled), or
the path-wise M⁻¹ of a callable ARM. ``R = Σ_i scale_i · R_i``. When every part lives on a lattice
the parts are lifted to the product lattice and ``A(x)`` is one dynamic program (THEORY §2);
otherwise it is a chunked enumeration of an enumerable space, or an error naming the estimators.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution

from seqppl.bellman import _check_table, path_rewards, soft_values
from seqppl.distributions.arm import ARM
from seqppl.distributions.nnx import NNXFunction, module_params
from seqppl.distributions.support import (
    SequenceSupport,
    batch_shape_of,
    checked_prompt,
    enumerate_sequences,
    map_over_batch,
)
from seqppl.lattice import Lattice
from seqppl.logspace import first_nan_or_pos_inf, logsumexp
from seqppl.space import MAX_ENUMERATE, SequenceSpace

__all__ = ["EBM"]

ENUMERATION_CHUNK = 4096
"""Sequences scored at once by the chunked enumeration of ``log_partition``."""


class EBM(Distribution):
    """Energy-based sequence distribution; ``event_shape = (T,)``, batch shape from the prompt.

    Args:
        reward_fn: ``reward_fn(tokens [..., T]) -> R [...]`` (``reward_fn(params, tokens)`` with
            ``params``; ``prompt=`` keyword when the EBM has a prompt). −∞ is a hard constraint.
        space: the ``SequenceSpace``.
        prompt: optional int ``[*batch, P]``.
        params: optional pytree of parameters.
        validate_args: NumPyro's flag; adds its out-of-support warning to ``log_prob``.

    Example:
        >>> import jax.numpy as jnp
        >>> from seqppl import SequenceSpace
        >>> ebm = EBM(lambda y: -jnp.sum(y, -1), SequenceSpace(vocab_size=2, length=2))
        >>> print(round(float(ebm.log_partition()), 4))  # log (1 + e^-1)^2
        0.6265
    """

    arg_constraints = {}
    has_enumerate_support = False
    pytree_data_fields = ("scales", "payloads", "prompt", "log_z_override")
    pytree_aux_fields = ("space", "kinds", "lattices", "fns", "joint", "log_partition_source")

    def __init__(
        self, reward_fn, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        self._setup(space, prompt, [("fn", 1.0, params, None, reward_fn)], validate_args)

    @classmethod
    def from_table(cls, lat: Lattice, r, prompt=None, *, validate_args=None) -> EBM:
        """Local rewards ``r`` on a lattice: ``R = Σ_t r[t, s_t, y_t]``; ``r`` is ``[S, A]``,
        ``[T, S, A]`` or a batch ``[*B, T, S, A]`` (batch shape: ``B`` broadcast with the prompt's).

        ``log_partition`` is then one DP; ``sample`` and ``to_arm`` use M.
        """
        r = _check_table(lat, r, "r", batched=True)
        return cls._build(lat.space, prompt, [("table", 1.0, r, lat, None)], validate_args)

    @classmethod
    def from_nnx(
        cls, module, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ) -> EBM:
        """An EBM whose sequence reward is a Flax NNX module's output ``[...]``; ``params`` its
        ``nnx.Param`` state as a pure dict (default: the module's own), as in ``ARM.from_nnx``."""
        reward_fn = NNXFunction(module)
        params = module_params(module) if params is None else params
        return cls(reward_fn, space, prompt, params=params, validate_args=validate_args)

    @classmethod
    def _build(cls, space, prompt, parts, validate_args=None, log_z=None, source="exact"):
        self = cls.__new__(cls)
        self._setup(space, prompt, parts, validate_args, log_z, source)
        return self

    def _setup(self, space, prompt, parts, validate_args, log_z=None, source="exact"):
        prompt = checked_prompt(space, prompt)
        self.space, self.prompt = space, prompt
        self.kinds = tuple(p[0] for p in parts)
        self.scales = tuple(p[1] for p in parts)
        self.payloads = tuple(p[2] for p in parts)
        self.lattices = tuple(p[3] for p in parts)
        self.fns = tuple(p[4] for p in parts)
        self.joint = _joint_lattice(self.lattices) if self.is_lattice else None
        self.log_z_override, self.log_partition_source = log_z, source
        batch = batch_shape_of(
            None,
            prompt,
            *(_part_batch(k, p) for k, p in zip(self.kinds, self.payloads, strict=True)),
        )
        super().__init__(batch, (space.horizon,), validate_args=validate_args)

    def _parts(self):
        return list(
            zip(self.kinds, self.scales, self.payloads, self.lattices, self.fns, strict=True)
        )

    @property
    def support(self):
        return SequenceSupport(self.space)

    @property
    def is_lattice(self) -> bool:
        """True when every part lives on a lattice: exact log Z, M and sampling by DP."""
        return all(lat is not None for lat in self.lattices)

    @property
    def params(self):
        """The parameters: the payload of a single part, else the tuple of payloads."""
        return self.payloads[0] if len(self.payloads) == 1 else self.payloads

    def with_params(self, params) -> EBM:
        """The same EBM with new ``params`` (same structure as ``params``)."""
        new = copy.copy(self)
        new.payloads = (params,) if len(self.payloads) == 1 else tuple(params)
        return new

    # -- rewards ----------------------------------------------------------------------------

    def unnormalized_log_prob(self, value) -> jax.Array:
        """``R(x, y)`` ``[...]``; −∞ outside the support.

        Raises:
            ValueError: when called eagerly and a ``reward_fn`` returns NaN or +∞.
        """
        value = jnp.asarray(value)
        if value.ndim == 0 or value.shape[-1] != self.space.horizon:
            return jnp.full(value.shape[:-1], -jnp.inf)
        lead = jnp.broadcast_shapes(value.shape[:-1], self.batch_shape)
        value = jnp.broadcast_to(value, (*lead, value.shape[-1]))
        ok = self.support(value)
        safe = jnp.where(ok[..., None], value, self.support.feasible_like(value)).astype(jnp.int32)
        parts = [
            self._part_reward(kind, payload, lat, fn, safe)
            for kind, _, payload, lat, fn in self._parts()
        ]
        total = sum(
            p if s is None else _scaled(s, p) for s, p in zip(self.scales, parts, strict=True)
        )
        return jnp.where(ok, total, -jnp.inf)

    def _part_reward(self, kind, payload, lat, fn, tokens):
        if kind in ("table", "constraint"):
            return lat.path_scores(payload, tokens, self.prompt).sum(-1)
        if kind == "arm":
            return payload.log_prob(tokens)
        if kind == "path":
            return path_rewards(payload.logits(tokens), tokens, self.space).sum(-1)
        args = (tokens,) if payload is None else (payload, tokens)
        out = fn(*args) if self.prompt is None else fn(*args, prompt=self.prompt)
        out = jnp.asarray(out)
        if out.shape != tokens.shape[:-1]:
            raise ValueError(f"reward_fn must return shape {tokens.shape[:-1]}, got {out.shape}")
        _refuse_bad_rewards(out, "reward_fn returned")
        return out

    def reward_table(self) -> jax.Array:
        """Lattice EBMs: local rewards ``[*B, T, S, A]`` on ``self.joint`` (parts lifted and
        summed; ``B`` the broadcast batch of the parts' tables, often empty)."""
        if not self.is_lattice:
            raise ValueError("reward_table needs every part on a lattice")
        T = self.space.horizon
        tables = [
            p.log_policy_table() if k == "arm" else p
            for k, p in zip(self.kinds, self.payloads, strict=True)
        ]
        batch = batch_shape_of(None, None, *(jnp.shape(t)[:-3] for t in tables))
        total = 0
        for (_, scale, _, lat, _), table in zip(self._parts(), tables, strict=True):
            table = jnp.broadcast_to(table, (*batch, T, *jnp.shape(table)[-2:]))
            table = _lift(self.joint, self.lattices, lat, table)
            total = total + (table if scale is None else _scaled(scale, table))
        return total

    # -- normalisation ----------------------------------------------------------------------

    def log_partition(self) -> jax.Array:
        """``A(x) = log Σ_y exp R(x, y)`` ``[*batch]``, exact and differentiable.

        By DP when every part is on a lattice, the root soft value for the path-wise M⁻¹ of a
        callable ARM, by chunked enumeration on enumerable spaces; the estimate given to
        ``with_log_partition`` if any (see ``log_partition_source``).

        Raises:
            ValueError: when none applies; the message names the estimators.
        """
        if self.log_z_override is not None:
            return self.log_z_override
        if self.is_lattice:
            table, joint = self.reward_table(), self.joint
            if table.ndim == 3:  # one DP serves every prompt
                return soft_values(joint, table)[0, joint.initial_state(self.prompt)]
            return map_over_batch(
                lambda t, p: soft_values(joint, t)[0, joint.initial_state(p)],
                self.batch_shape,
                table,
                self.prompt,
            )
        if self.kinds == ("path",):  # to_ebm of a callable ARM: A(x) = V_q(x)
            logits = self.payloads[0].logits(self.support.feasible_like(jnp.zeros(self._shape())))
            return logsumexp(self.space.mask_logits(logits)[..., 0, :], -1)
        if self.space.num_sequences <= MAX_ENUMERATE:
            return self._enumerated_log_partition()
        raise ValueError(
            f"log Z of this EBM is not tractable ({self.space.num_sequences} sequences, parts not "
            "all on lattices): estimate it with sp.log_partition(ebm, method='is' or 'smc', "
            "proposal=arm) and attach it with ebm.with_log_partition(estimate)"
        )

    def _shape(self):
        return (*self.batch_shape, self.space.horizon)

    def _enumerated_log_partition(self):
        seqs = jnp.asarray(self.space.enumerate())
        n = seqs.shape[0]
        chunks = -(-n // ENUMERATION_CHUNK)
        padded = jnp.concatenate(
            [seqs, jnp.broadcast_to(seqs[:1], (chunks * ENUMERATION_CHUNK - n, seqs.shape[1]))]
        )
        keep = jnp.arange(chunks * ENUMERATION_CHUNK) < n
        batch_axes = (1,) * len(self.batch_shape)

        def chunk_lse(args):
            block, mask = args
            tokens = block.reshape(block.shape[0], *batch_axes, block.shape[-1])
            tokens = jnp.broadcast_to(tokens, (block.shape[0], *self._shape()))
            scores = self.unnormalized_log_prob(tokens)
            mask = mask.reshape(mask.shape[0], *batch_axes)
            return logsumexp(jnp.where(mask, scores, -jnp.inf), 0)

        per_chunk = jax.lax.map(
            chunk_lse,
            (padded.reshape(chunks, ENUMERATION_CHUNK, -1), keep.reshape(chunks, -1)),
        )
        log_z = logsumexp(per_chunk, 0)
        _refuse_bad_rewards(log_z, "the rewards summed in log Z hold")
        return log_z

    def with_log_partition(self, estimate) -> EBM:
        """This EBM with ``log_prob = R − estimate`` (a number or a ``PartitionEstimate``).

        ``log_partition_source`` becomes ``"estimate"`` and ``log_partition_estimate`` keeps the
        estimate (with its standard error, if it has one).
        """
        log_z = getattr(estimate, "log_z", estimate)
        new = self._build(
            self.space,
            self.prompt,
            self._parts(),
            self._validate_args,
            jnp.asarray(log_z),
            "estimate",
        )
        new.log_partition_estimate = estimate
        return new

    # -- Distribution API -------------------------------------------------------------------

    def log_prob(self, value):
        """``R(x, y) − A(x)`` ``[...]``; −∞ outside the support and where ``R = −∞`` (never NaN).

        ``A(x)`` is exact (``log_partition_source == "exact"``) unless this EBM came from
        ``with_log_partition``: then it is that estimate (``log_partition_source == "estimate"``,
        the estimate with its standard error in ``log_partition_estimate``), and ``log_prob``
        inherits the estimate's error as a common shift of every sequence.
        """
        if self._validate_args:
            self._validate_sample(jnp.asarray(value))
        reward = self.unnormalized_log_prob(value)
        log_z = jnp.broadcast_to(self.log_partition(), reward.shape)
        # R = −∞ scores −∞ even when every sequence is excluded (log Z = −∞): never NaN
        return jnp.where(reward == -jnp.inf, -jnp.inf, reward - log_z)

    def sample(self, key, sample_shape=()):
        """Exact samples ``[*sample_shape, *batch, T]``: via M on lattices, else a categorical
        over the enumerated space; otherwise an error naming the approximate samplers."""
        if self.is_lattice:
            from seqppl.distributions.convert import to_arm

            return to_arm(self).sample(key, sample_shape)
        if self.space.num_sequences > MAX_ENUMERATE:
            raise ValueError(
                "exact sampling needs a lattice EBM or an enumerable space; weighted "
                "approximate samples: est = sp.log_partition(ebm, 'smc', proposal, n, key) "
                "(est.samples, est.log_weights), or distil an ARM with sp.distill"
            )
        seqs = self.enumerate_support(expand=True)
        scores = self.unnormalized_log_prob(seqs)
        shape = tuple(sample_shape) + self.batch_shape
        idx = jax.random.categorical(key, scores, axis=0, shape=shape)
        flat = jnp.asarray(self.space.enumerate())
        return flat[idx]

    def enumerate_support(self, expand=True):
        """Every sequence ``[N, *batch, T]`` (``[N, 1.., T]`` unexpanded); small spaces only."""
        return enumerate_sequences(self.space, self.batch_shape, expand)

    # -- composition ------------------------------------------------------------------------

    @classmethod
    def _tilt(cls, arm: ARM, reward, scale) -> EBM:
        if isinstance(reward, EBM):
            _same_space(arm.space, reward.space, "reward")
            parts = [
                (k, None if s is None else scale * s, p, lat, fn)
                for k, s, p, lat, fn in reward._parts()
            ]
        elif callable(reward):
            parts = [("fn", scale, None, None, reward)]
        else:
            raise TypeError(f"reward must be an EBM or a callable, got {type(reward).__name__}")
        prompt = _common_prompt(arm.prompt, getattr(reward, "prompt", None))
        return cls._build(arm.space, prompt, [("arm", 1.0, arm, arm.lattice, None), *parts])

    def __mul__(self, other: EBM) -> EBM:
        """Product of experts: ``R = R_self + R_other``."""
        if not isinstance(other, EBM):
            return NotImplemented
        _same_space(self.space, other.space, "other")
        prompt = _common_prompt(self.prompt, other.prompt)
        return self._build(self.space, prompt, self._parts() + other._parts())

    def tempered(self, beta) -> EBM:
        """``p ∝ exp(beta · R)``; hard constraints (−∞ entries, ``constrain``) stay hard."""
        parts = [
            (k, None if s is None else beta * s, p, lat, fn) for k, s, p, lat, fn in self._parts()
        ]
        return self._build(self.space, self.prompt, parts)

    def constrain(self, lat: Lattice, accepting) -> EBM:
        """``R`` where the DFA ``lat`` ends in a state of ``accepting``, else −∞."""
        _same_space(self.space, lat.space, "lat")
        table = lat.accepting_rewards(accepting, jnp.result_type(float))
        return self._build(
            self.space, self.prompt, self._parts() + [("constraint", None, table, lat, None)]
        )


def _part_batch(kind, payload) -> tuple[int, ...]:
    """The batch shape a part contributes: a batched table's, or a nested distribution's."""
    if kind in ("arm", "path"):
        return payload.batch_shape
    return batch_shape_of(payload) if kind in ("table", "constraint") else ()


def _refuse_bad_rewards(values, what):
    """Eagerly refuse NaN / +∞ sequence rewards (−∞ is a legal hard constraint)."""
    idx = first_nan_or_pos_inf(values)
    if idx is not None:
        raise ValueError(
            f"{what} {float(np.asarray(values)[idx])} at index {list(idx)}: rewards are finite "
            "or −∞ (a constraint), never NaN or +∞"
        )


def _scaled(scale, reward):
    """``scale · reward``, keeping −∞ (a hard constraint) at −∞ for every scale."""
    hard = reward == -jnp.inf
    return jnp.where(hard, -jnp.inf, scale * jnp.where(hard, 0, reward))


def _same_space(space, other, name):
    if other != space:
        raise ValueError(f"{name} is over {other}, not {space}")


def _common_prompt(a, b):
    if a is None or b is None or a is b:
        return a if b is None else b
    if not isinstance(a, jax.core.Tracer) and not isinstance(b, jax.core.Tracer):
        if a.shape != b.shape or not bool(jnp.all(a == b)):
            raise ValueError("the parts have different prompts; give them the same prompt")
    return a


def _distinct(lattices):
    out = []
    for lat in lattices:
        if lat is not None and all(lat is not seen for seen in out):
            out.append(lat)
    return out


def _joint_lattice(lattices):
    distinct = _distinct(lattices)
    joint = distinct[0]
    for lat in distinct[1:]:
        joint = joint.product(lat)
    return joint


def _lift(joint, lattices, lat, table):
    """Lift a table on ``lat`` to ``joint = ((L_0 × L_1) × L_2) × ...`` (the distinct lattices)."""
    distinct = _distinct(lattices)
    position = next(i for i, seen in enumerate(distinct) if seen is lat)
    chain = [joint]  # J_n, J_{n-1}, ..., J_0 = L_0
    while len(chain) < len(distinct):
        chain.append(chain[-1].factors[0])
    chain.reverse()
    out = table if position == 0 else chain[position].lift(table, 1)
    for product in chain[position + 1 :]:
        out = product.lift(out, 0)
    return out
