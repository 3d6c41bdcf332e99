"""ARM: an autoregressive model as a NumPyro distribution over token sequences.

``p_q(y | x) = Π_{t ≤ τ} softmax(q(s_t, ·))[y_t]`` with logits from a lattice table or from any
causal function ``tokens [..., T] -> logits [..., T, A]`` (``seqppl.distributions.logits``: one
source class per kind, chosen when the ARM is built). ``log_prob`` is one teacher-forced pass;
``sample`` is one ``lax.scan`` (``ancestral_sample``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution

from seqppl.checks import check_key, check_tokens
from seqppl.distributions.ancestral import ancestral_sample
from seqppl.distributions.ebm import EBM
from seqppl.distributions.logits import TableLogits, function_logits
from seqppl.distributions.nnx import NNXFunction, module_params
from seqppl.distributions.parts import ReferenceLogProb
from seqppl.distributions.support import (
    SequenceDistribution,
    SequenceSupport,
    batch_shape_of,
    checked_prompt,
    enumerate_sequences,
)
from seqppl.lattice import Lattice
from seqppl.logspace import log_softmax
from seqppl.space import SequenceSpace
from seqppl.tables import check_reachable, check_table

__all__ = ["ARM"]


class ARM(SequenceDistribution):
    """Autoregressive sequence distribution; ``event_shape = (T,)``, batch shape from the prompt.

    Args:
        logits_fn: causal ``logits_fn(tokens [..., T]) -> [..., T, A]`` (entry t may read only
            ``tokens[..., :t]`` and the prompt), called as ``logits_fn(params, tokens)`` when
            ``params`` is given, with ``prompt=`` when the ARM has a prompt. If it also follows
            the ``CachedLogits`` protocol (``init(batch_shape) -> (logits, cache)``,
            ``step(cache, token) -> (logits, cache)``), sampling uses that cached step instead
            of re-evaluating the growing buffer (O(T²)); the protocol is checked here.
        space: the ``SequenceSpace``.
        prompt: optional int ``[*batch, P]``.
        params: optional pytree of parameters (data: differentiable, traceable).
        validate_args: NumPyro's flag; adds its out-of-support warning to ``log_prob``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from seqppl import SequenceSpace, Lattice
        >>> space = SequenceSpace(vocab_size=2, length=2, eos=True)
        >>> arm = ARM.from_table(Lattice.markov(space, 0), jnp.zeros((1, 3)))
        >>> y = arm.sample(jax.random.key(0), (4,))
        >>> y.shape, arm.log_prob(jnp.array([2, 2, 2])).round(4).item()
        ((4, 3), -1.0986)
    """

    arg_constraints = {}
    has_enumerate_support = False
    pytree_data_fields = ("source", "prompt")
    pytree_aux_fields = ("space",)

    def __init__(
        self, logits_fn, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ):
        prompt = checked_prompt(space, prompt)
        batch = batch_shape_of(None, prompt)
        self._setup(space, function_logits(logits_fn, space, params, prompt, batch), prompt)
        super().__init__(batch, (space.horizon,), validate_args=validate_args)

    @classmethod
    def from_table(
        cls, lat: Lattice, q, prompt=None, *, validate_args=None, trusted: bool = False
    ) -> ARM:
        """An ARM whose logits are a lattice table ``q`` (its params): ``[S, A]``, ``[T, S, A]``,
        or a batch of tables ``[*B, T, S, A]`` (batch shape: ``B`` broadcast with the prompt's).

        ``trusted``: ``q`` and ``prompt`` were already validated (internal conversions).

        Raises:
            ValueError: bad shape, NaN/+∞, or a state reachable from ``prompt`` with no finite
                allowed logit (not a distribution).
        """
        if not trusted:
            prompt = checked_prompt(lat.space, prompt)
            q = check_table(lat, q, "q", batched=True)
            check_reachable(lat, q, prompt)
        self = cls.__new__(cls)
        self._setup(lat.space, TableLogits(q, lat), prompt)
        Distribution.__init__(
            self, batch_shape_of(q, prompt), (lat.space.horizon,), validate_args=validate_args
        )
        return self

    @classmethod
    def from_nnx(
        cls, module, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ) -> ARM:
        """An ARM whose logits are a Flax NNX module's output; ``params`` its ``nnx.Param`` state.

        ``params`` (a pure nested dict, default: the module's own) is the ARM's data, so ``jit``,
        ``grad`` and ``with_params`` work on it; ``nnx_arm`` registers it as NumPyro sites. A
        module with pure ``init`` / ``step`` methods (``CachedLogits``) is sampled by cached steps.
        """
        logits_fn = NNXFunction(module)
        params = module_params(module) if params is None else params
        return cls(logits_fn, space, prompt, params=params, validate_args=validate_args)

    def _setup(self, space, source, prompt):
        self.space, self.source, self.prompt = space, source, prompt

    @property
    def support(self):
        return SequenceSupport(self.space)

    @property
    def params(self):
        """The trainable parameters: the table of a table ARM, else the ``params=`` pytree."""
        return self.source.params

    @property
    def lattice(self) -> Lattice | None:
        """The lattice of a table ARM; None for a callable ARM."""
        return self.source.lattice

    @property
    def logits_fn(self):
        """The logits function of a callable ARM; None for a table ARM."""
        return getattr(self.source, "fn", None)

    def with_params(self, params) -> ARM:
        """The same ARM with new ``params`` (for a table ARM: a new table, unchecked)."""
        new = type(self).__new__(type(self))
        new._setup(self.space, self.source.with_params(params), self.prompt)
        batch = batch_shape_of(None, self.prompt, new.source.batch_shape)
        Distribution.__init__(new, batch, (self.space.horizon,), validate_args=self._validate_args)
        return new

    # -- logits -----------------------------------------------------------------------------

    def logits(self, tokens) -> jax.Array:
        """Raw logits ``[..., T, A]`` of each decision along ``tokens [..., T]`` (no mask)."""
        return self.source.logits(check_tokens(tokens, self.space), self.prompt)

    def log_policies(self, tokens) -> jax.Array:
        """Normalised next-token log-probabilities ``log π(· | s_t)`` ``[..., T, A]`` at every
        decision along ``tokens [..., T]`` (space mask applied; rows after EOS are not used)."""
        return log_softmax(self.space.mask_logits(self.logits(tokens)), -1)

    def log_policy_table(self) -> jax.Array:
        """Table ARMs: ``log π[t, s, a]`` ``[*B, T, S, A]`` (last-decision mask applied)."""
        return self.source.log_policy_table()

    # -- Distribution API -------------------------------------------------------------------

    def log_prob(self, value, intermediates=None):
        """``log p_q(y)`` ``[...]`` of int tokens ``[..., T]``; −∞ outside the support (ids out
        of range, a non-EOS after EOS, no EOS by the horizon), never NaN from finite logits.

        With ``intermediates`` (the step log-probs from ``sample_with_intermediates``) it is
        their sum, with no second pass. ``validate_args=True`` adds NumPyro's out-of-support
        warning (concrete values only).

        Raises:
            TypeError: ``value`` has no integer dtype (static, so also under ``jit``).
            ValueError: its last axis is not ``T`` (static); a callable ARM's logits are not
                ``[..., T, A]`` (static) or hold NaN/+∞ where concrete. Under tracing (``jit``,
                ``grad``, NUTS) values are invisible: NaN or +∞ logits then give NaN.
        """
        if intermediates:
            return jnp.sum(intermediates[0], -1)
        value = check_tokens(value, self.space)
        if self._validate_args:
            self._validate_sample(value)
        return self.source.log_prob(value, self.prompt)

    def sample_with_intermediates(self, key, sample_shape=()):
        """``(tokens [*sample, *batch, T], [step log-probs [*sample, *batch, T]])``."""
        key = check_key(key)
        shape = tuple(sample_shape) + self.batch_shape
        tokens, log_ps = ancestral_sample(key, shape, self.space, *self.decoder(shape))
        return tokens, [log_ps]

    def decoder(self, shape):
        """``(state, next_logits(state, t) -> [*shape, A], advance(state, token, t) -> state)``
        for decoding ``shape`` sequences (``shape`` ends with ``batch_shape``).

        Raw (unmasked) logits; the state is the lattice state for table ARMs, the cache of a
        ``CachedLogits`` function, else a token buffer ``[*shape, T]`` re-evaluated each step.
        Non-scalar state leaves lead with ``shape`` (resamplers gather them along those axes)."""
        return self.source.decoder(shape, self.prompt)

    def sample(self, key, sample_shape=()):
        """Ancestral samples ``[*sample_shape, *batch_shape, T]`` (EOS-padded)."""
        return self.sample_with_intermediates(key, sample_shape)[0]

    def enumerate_support(self, expand=True):
        """Every sequence ``[N, *batch, T]`` (``[N, 1.., T]`` unexpanded); small spaces only."""
        return enumerate_sequences(self.space, self.batch_shape, expand)

    def entropy(self):
        """Exact ``H(p_q) = −Σ_{t,s,a} μ_t(s, a) log π_t(a|s)`` for table ARMs, ``[*batch]``.

        ``μ`` is the occupancy of the normalised table. Callable ARMs: estimate it as
        ``−mean(log_prob(samples))``.
        """
        return self.source.entropy(self.prompt, self.batch_shape)

    def tilt(self, reward, scale=1.0) -> EBM:
        """The EBM ``p ∝ p_arm · exp(scale · R)``; ``reward`` an EBM or ``reward_fn(tokens)``."""
        return EBM.from_tilt(self, reward, scale)

    def constrain(self, lat: Lattice, accepting=None) -> EBM:
        """The ARM conditioned on a regular constraint: ``R(y) = log p_arm(y)`` where the DFA
        ``lat`` ends in a state of ``accepting`` (default ``lat.accepting``), else −∞.

        Its ``log_partition()`` is ``log P_arm(y accepted)``, its samples are the ARM's samples
        given acceptance, and ``to_arm`` of it (exact on lattices) is the conditioned ARM. This
        differs from ``to_ebm(arm).constrain(...)``, whose ``log Z`` carries the root value
        ``V_q(x)`` of the raw logits (``to_ebm(arm, normalized=True)`` is this method's base).
        """
        parts = (ReferenceLogProb(self),)
        return EBM.from_parts(parts, self.space, self.prompt, self._validate_args).constrain(
            lat, accepting
        )
