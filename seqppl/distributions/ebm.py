"""EBM: an energy-based model ``p_R(y | x) = exp(R(x, y) − A(x))`` as a NumPyro distribution.

An EBM is a sum of typed parts (``seqppl.distributions.parts``): local-reward tables on lattices,
DFA constraints, a reference ARM's ``log p`` (a tilt), the path-wise M⁻¹ of a callable ARM, user
reward functions. ``R = Σ_i scale_i · R_i``. The EBM asks its parts once which exact route it has
(``exact_route``): one dynamic program on the product of their lattices, the ARM it came from,
a chunked enumeration of the space, or none; ``log_partition``, ``sample``, ``to_arm`` and every
estimator and trainer follow that one answer.
"""

from __future__ import annotations

import functools
from functools import cached_property

import jax
import jax.numpy as jnp

from seqppl.bellman import root_values, soft_bellman
from seqppl.checks import check_key, check_same_space, check_tokens, refuse_invalid
from seqppl.distributions.ancestral import ancestral_sample
from seqppl.distributions.logits import TableLogits
from seqppl.distributions.nnx import NNXFunction, module_params
from seqppl.distributions.parts import (
    Constraint,
    PathRewards,
    ReferenceLogProb,
    RewardFunction,
    RewardTable,
)
from seqppl.distributions.routes import AttachedLogZ, ExactRoute, NoExactRoute
from seqppl.distributions.support import (
    SequenceDistribution,
    SequenceSupport,
    batch_shape_of,
    checked_prompt,
    enumerate_sequences,
    map_in_chunks,
    map_over_batch,
)
from seqppl.lattice import Lattice
from seqppl.logspace import logsumexp
from seqppl.products import joint_lattice, lift_to_joint
from seqppl.space import ENUMERATION_CHUNK, MAX_ENUMERATE, SequenceSpace
from seqppl.tables import check_table, per_decision, table_batch_shape

__all__ = ["EBM"]

OVERFLOW_HINT = (
    "the rewards overflow the float dtype (an entry, a scale or a path's sum of finite "
    "entries): rescale them, lower the scale, or enable float64"
)


class EBM(SequenceDistribution):
    """Energy-based sequence distribution; ``event_shape = (T,)``, batch shape from the prompt
    and the parts.

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
    pytree_data_fields = ("parts", "prompt", "attached")
    pytree_aux_fields = ("space",)

    def __init__(
        self, reward_fn, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        prompt = checked_prompt(space, prompt)
        self._setup(space, prompt, (RewardFunction(reward_fn, params),), validate_args)

    @classmethod
    def from_table(
        cls, lat: Lattice, r, prompt=None, *, validate_args=None, trusted: bool = False
    ) -> EBM:
        """Local rewards ``r`` on a lattice: ``R = Σ_t r[t, s_t, y_t]``; ``r`` is ``[S, A]``,
        ``[T, S, A]`` or a batch ``[*B, T, S, A]`` (batch shape: ``B`` broadcast with the prompt's).

        ``log_partition`` is then one DP; ``sample`` and ``to_arm`` use M. ``trusted``: ``r`` and
        ``prompt`` were already validated (internal conversions).
        """
        if not trusted:
            prompt = checked_prompt(lat.space, prompt)
            r = check_table(lat, r, "r", batched=True)
        return cls.from_parts((RewardTable(r, lat),), lat.space, prompt, validate_args)

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
    def from_parts(cls, parts, space: SequenceSpace, prompt=None, validate_args=None) -> EBM:
        """The EBM ``R = Σ_i scale_i · R_i`` of ``parts`` (``seqppl.distributions.parts``),
        trusted as built: ``prompt`` is None or an already validated int32 ``[*batch, P]``."""
        self = cls.__new__(cls)
        self._setup(space, prompt, tuple(parts), validate_args)
        return self

    @classmethod
    def from_tilt(cls, arm, reward, scale=1.0) -> EBM:
        """``p ∝ p_arm · exp(scale · R)``: ``reward`` an EBM (its parts scaled, hard parts
        kept) or a ``reward_fn(tokens)``; ``scale`` stays data (differentiable under NUTS)."""
        if isinstance(reward, EBM):
            check_same_space("reward", reward.space, arm.space)
            parts = tuple(part.scaled(scale) for part in reward.parts)
            prompt = _common_prompt(arm.prompt, reward.prompt)
        elif callable(reward):
            parts, prompt = (RewardFunction(reward, None, scale),), arm.prompt
        else:
            raise TypeError(f"reward must be an EBM or a callable, got {type(reward).__name__}")
        return cls.from_parts((ReferenceLogProb(arm), *parts), arm.space, prompt)

    def _setup(self, space, prompt, parts, validate_args, attached=None):
        self.space, self.prompt, self.parts, self.attached = space, prompt, parts, attached
        batch = batch_shape_of(None, prompt, *(part.batch_shape for part in parts))
        super().__init__(batch, (space.horizon,), validate_args=validate_args)

    @property
    def support(self):
        return SequenceSupport(self.space)

    # -- the exact route ---------------------------------------------------------------------

    @cached_property
    def exact_route(self) -> ExactRoute:
        """How ``log Z``, samples and ``to_arm`` are computed exactly (``ExactRoute``)."""
        if all(part.lattice is not None for part in self.parts):
            return ExactRoute.DYNAMIC_PROGRAM
        if len(self.parts) == 1 and isinstance(self.parts[0], PathRewards):
            if self.parts[0].scale is None:  # unscaled: the EBM is the ARM itself
                return ExactRoute.ARM
        if self.space.num_sequences <= MAX_ENUMERATE:
            return ExactRoute.ENUMERATION
        return ExactRoute.NONE

    @property
    def is_lattice(self) -> bool:
        """True when every part lives on a lattice: exact log Z, M and sampling by DP."""
        return self.exact_route is ExactRoute.DYNAMIC_PROGRAM

    @cached_property
    def joint(self) -> Lattice | None:
        """The product of the parts' distinct lattices (the DP route), else None."""
        return joint_lattice([p.lattice for p in self.parts]) if self.is_lattice else None

    @property
    def params(self):
        """The parameters: those of a single part, else the tuple of every part's."""
        payloads = tuple(part.params for part in self.parts)
        return payloads[0] if len(payloads) == 1 else payloads

    def with_params(self, params) -> EBM:
        """The same EBM with new ``params`` (same structure as ``params``)."""
        params = (params,) if len(self.parts) == 1 else tuple(params)
        parts = tuple(part.with_params(p) for part, p in zip(self.parts, params, strict=True))
        new = type(self).__new__(type(self))
        new._setup(self.space, self.prompt, parts, self._validate_args, self.attached)
        return new

    # -- rewards ----------------------------------------------------------------------------

    def unnormalized_log_prob(self, value) -> jax.Array:
        """``R(x, y)`` ``[...]``; −∞ outside the support.

        Raises:
            TypeError: ``value`` has no integer dtype (static, so also under ``jit``).
            ValueError: its last axis is not ``T`` (static), or, when called eagerly, a
                ``reward_fn`` returns NaN or +∞.
        """
        value = check_tokens(value, self.space)
        lead = jnp.broadcast_shapes(value.shape[:-1], self.batch_shape)
        value = jnp.broadcast_to(value, (*lead, value.shape[-1]))
        ok = self.support(value)
        safe = jnp.where(ok[..., None], value, self.support.feasible_like(value)).astype(jnp.int32)
        total = sum(part.weighted_score(safe, self.prompt, self.space) for part in self.parts)
        return jnp.where(ok, total, -jnp.inf)

    def reward_table(self) -> jax.Array:
        """DP route: local rewards on ``self.joint`` (parts lifted and summed): ``[S, A]`` when
        every part's table is homogeneous (no copy per decision), else ``[*B, T, S, A]`` (``B``
        the broadcast batch of the parts' tables, often empty)."""
        if not self.is_lattice:
            raise NoExactRoute("reward_table needs every part on a lattice")
        T = self.space.horizon
        lattices = [part.lattice for part in self.parts]
        tables = [part.local_rewards() for part in self.parts]
        if any(jnp.ndim(t) > 2 for t in tables):  # else all homogeneous: stay [S, A]
            tables = [per_decision(t, T) for t in tables]
            batch = batch_shape_of(None, None, *(table_batch_shape(t) for t in tables))
            tables = [jnp.broadcast_to(t, (*batch, *t.shape[-3:])) for t in tables]
        terms = [
            part.weighted(lift_to_joint(self.joint, lattices, part.lattice, table))
            for part, table in zip(self.parts, tables, strict=True)
        ]
        return functools.reduce(jnp.add, terms)  # no "0 + table": XLA keeps that pass

    def exact_logits(self) -> jax.Array:
        """DP route: the ARM logits ``q = M(r)`` ``[*B, T, S, A]`` on ``self.joint``, computed
        once per EBM (kept unless traced)."""
        cached = self.__dict__.get("_exact_logits")
        if cached is not None:
            return cached
        table, joint = self.reward_table(), self.joint
        q = map_over_batch(
            lambda r, _: soft_bellman(joint, r, trusted=True)[0],
            table_batch_shape(table),
            table,
            None,
        )
        if not isinstance(q, jax.core.Tracer):
            self.__dict__["_exact_logits"] = q
        return q

    # -- normalisation ----------------------------------------------------------------------

    def log_partition(self) -> jax.Array:
        """``A(x) = log Σ_y exp R(x, y)`` ``[*batch]``, exact and differentiable.

        Follows ``exact_route``: one DP on the joint lattice, the root soft value of the ARM it
        came from, or a chunked enumeration; the estimate given to ``with_log_partition`` if any
        (see ``log_partition_source``).

        Raises:
            NoExactRoute: (a ``ValueError``) when there is no exact route; the message names
                the estimators.
            ValueError: a concrete ``log Z`` of +∞ or NaN: rewards that overflow the float
                dtype (an entry, a scale, or a path's sum of finite entries). Under tracing
                (``jit``, ``grad``, NUTS) it cannot be seen: ``log_prob`` is then NaN or −∞
                for every sequence, which NUTS takes for zero density (docs/numpyro.md).
        """
        if self.attached is not None:
            return self.attached.log_z
        log_z = self._exact_log_partition()
        refuse_invalid(log_z, "log Z", hint=OVERFLOW_HINT)
        return log_z

    def _exact_log_partition(self):
        route = self.exact_route
        if route is ExactRoute.DYNAMIC_PROGRAM:
            table, joint = self.reward_table(), self.joint

            def root_value(table, prompt):
                values = root_values(joint, table, trusted=True)
                return values[joint.initial_state(prompt, trusted=True)]

            if table.ndim <= 3:  # one DP serves every prompt
                return root_value(table, self.prompt)
            return map_over_batch(root_value, self.batch_shape, table, self.prompt)
        if route is ExactRoute.ARM:
            return self.parts[0].root_value(self.space, self.batch_shape)
        if route is ExactRoute.ENUMERATION:
            return self._enumerated_log_partition()
        raise NoExactRoute(
            f"log Z of this EBM is not tractable ({self.space.num_sequences} sequences, parts "
            "not all on lattices): estimate it with sp.log_partition(ebm, method='is' or 'smc', "
            "proposal=arm) and attach it with ebm.with_log_partition(estimate)"
        )

    def _enumerated_log_partition(self):
        batch_axes = (1,) * len(self.batch_shape)
        shape = (*self.batch_shape, self.space.horizon)

        def scores(block):
            tokens = block.reshape(block.shape[0], *batch_axes, block.shape[-1])
            return self.unnormalized_log_prob(jnp.broadcast_to(tokens, (block.shape[0], *shape)))

        seqs = jnp.asarray(self.space.enumerate())
        rewards = map_in_chunks(scores, seqs, min(len(seqs), ENUMERATION_CHUNK))
        return logsumexp(rewards, 0)

    def with_log_partition(self, estimate) -> EBM:
        """This EBM with ``log_prob = R − estimate`` (a number or a ``PartitionEstimate``).

        ``log_partition_source`` becomes ``"estimate"`` and ``log_partition_estimate`` keeps the
        estimate (with its standard error, if it has one); both survive ``jax.tree`` round trips.
        """
        log_z = jnp.asarray(getattr(estimate, "log_z", estimate))
        new = type(self).__new__(type(self))
        new._setup(
            self.space, self.prompt, self.parts, self._validate_args, AttachedLogZ(log_z, estimate)
        )
        return new

    @property
    def log_partition_source(self) -> str:
        """``"exact"``, or ``"estimate"`` after ``with_log_partition``."""
        return "exact" if self.attached is None else "estimate"

    @property
    def log_partition_estimate(self):
        """The estimate given to ``with_log_partition`` (None when ``log Z`` is exact)."""
        return None if self.attached is None else self.attached.estimate

    # -- Distribution API -------------------------------------------------------------------

    def log_prob(self, value):
        """``R(x, y) − A(x)`` ``[...]`` of int tokens ``[..., T]``; −∞ outside the support and
        where ``R = −∞``, never NaN where the rewards and ``log Z`` are finite.

        ``A(x)`` is exact (``log_partition_source == "exact"``) unless this EBM came from
        ``with_log_partition``: then it is that estimate, and ``log_prob`` inherits the
        estimate's error as a common shift of every sequence. ``validate_args=True`` adds
        NumPyro's out-of-support warning (concrete values only).

        Raises:
            TypeError, ValueError: as ``unnormalized_log_prob`` (dtype and shape: static, also
                under ``jit``) and ``log_partition`` (concrete NaN/+∞). Under tracing values are
                invisible: a table or reward that overflows to +∞ inside ``jit`` or NUTS gives
                NaN or −∞ here, not an error (docs/numpyro.md, "Values under tracing").
        """
        value = check_tokens(value, self.space)
        if self._validate_args:
            self._validate_sample(value)
        reward = self.unnormalized_log_prob(value)
        log_z = jnp.broadcast_to(self.log_partition(), reward.shape)
        # R = −∞ scores −∞ even when every sequence is excluded (log Z = −∞): never NaN
        return jnp.where(reward == -jnp.inf, -jnp.inf, reward - log_z)

    def sample(self, key, sample_shape=()):
        """Exact samples ``[*sample_shape, *batch, T]`` along ``exact_route``: M on the joint
        lattice (built once), the ARM it came from, or a categorical over the enumerated space.

        Raises:
            NoExactRoute: no exact route; the message names the approximate samplers.
        """
        key = check_key(key)
        shape = tuple(sample_shape) + self.batch_shape
        route = self.exact_route
        if route is ExactRoute.DYNAMIC_PROGRAM:
            decoder = TableLogits(self.exact_logits(), self.joint).decoder(shape, self.prompt)
            return ancestral_sample(key, shape, self.space, *decoder)[0]
        if route is ExactRoute.ARM:
            return self.parts[0].arm.sample(key, sample_shape)
        if route is ExactRoute.NONE:
            raise NoExactRoute(
                "exact sampling needs a lattice EBM or an enumerable space; weighted "
                "approximate samples: est = sp.log_partition(ebm, 'smc', proposal, n, key) "
                "(est.samples, est.log_weights), or distil an ARM with sp.distill"
            )
        scores = self.unnormalized_log_prob(self.enumerate_support(expand=True))
        index = jax.random.categorical(key, scores, axis=0, shape=shape)
        return jnp.asarray(self.space.enumerate())[index]

    def enumerate_support(self, expand=True):
        """Every sequence ``[N, *batch, T]`` (``[N, 1.., T]`` unexpanded); small spaces only."""
        return enumerate_sequences(self.space, self.batch_shape, expand)

    # -- composition ------------------------------------------------------------------------

    def __mul__(self, other: EBM) -> EBM:
        """Product of experts: ``R = R_self + R_other``."""
        if not isinstance(other, EBM):
            return NotImplemented
        check_same_space("other", other.space, self.space)
        prompt = _common_prompt(self.prompt, other.prompt)
        return self.from_parts(self.parts + other.parts, self.space, prompt)

    def tempered(self, beta) -> EBM:
        """``p ∝ exp(beta · R)``; hard constraints (−∞ entries, ``constrain``) stay hard."""
        parts = tuple(part.scaled(beta) for part in self.parts)
        return self.from_parts(parts, self.space, self.prompt)

    def constrain(self, lat: Lattice, accepting=None) -> EBM:
        """``R`` where the DFA ``lat`` ends in a state of ``accepting`` (default ``lat.accepting``),
        else −∞; its log Z is a log-probability only for a normalised EBM (``arm.constrain``)."""
        check_same_space("lat", lat.space, self.space)
        constraint = Constraint(lat.accepting_rewards(accepting, jnp.result_type(float)), lat)
        return self.from_parts((*self.parts, constraint), self.space, self.prompt)


def _common_prompt(a, b):
    """The prompt two composed distributions share (``ValueError`` if they differ)."""
    if a is None or b is None or a is b:
        return a if b is None else b
    if not isinstance(a, jax.core.Tracer) and not isinstance(b, jax.core.Tracer):
        if a.shape != b.shape or not bool(jnp.all(a == b)):
            raise ValueError("the parts have different prompts; give them the same prompt")
    return a
