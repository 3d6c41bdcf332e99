"""SequenceSpace: the set of token sequences a model is a distribution over
(docs/theory.md#sequence-spaces).

A fixed-length space holds every sequence of exactly ``L`` tokens from ``0..V-1``: its horizon
(number of decisions) is ``T = L`` and its action set is the vocabulary. A variable-length space
holds every response of at most ``L`` tokens followed by the end token ``EOS = V``: ``T = L + 1``
decisions over ``A = V + 1`` actions, and the stored array is padded with EOS after the first one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import as_array

__all__ = ["SequenceSpace", "MAX_ENUMERATE", "SMALL_SPACE", "ENUMERATION_CHUNK"]

MAX_ENUMERATE = 1 << 22
"""Largest number of sequences ``SequenceSpace.enumerate`` materialises (4,194,304)."""
SMALL_SPACE = 1 << 16
"""Spaces of up to this many sequences (65,536) are enumerated wherever exactness is cheap: the
check that a proposal covers the target's support, exact distillation gradients and exact
evaluation reports."""
ENUMERATION_CHUNK = 4096
"""Sequences scored at once wherever a space is enumerated (log Z, exact risks, reports)."""


@dataclass(frozen=True)
class SequenceSpace:
    """Token sequences over a vocabulary ``0..V-1``, of fixed length or ended by EOS.

    Args:
        vocab_size: ``V >= 1``, the number of ordinary tokens.
        length: ``L >= 1``; exactly ``L`` tokens (``eos=False``) or at most ``L`` then EOS.
        eos: whether responses end with the end token ``EOS = V``.

    Example:
        >>> space = SequenceSpace(vocab_size=2, length=2, eos=True)
        >>> space.horizon, space.num_actions, space.eos_id, space.num_sequences
        (3, 3, 2, 7)
    """

    vocab_size: int
    length: int
    eos: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.eos, (bool, np.bool_)):
            raise TypeError(f"eos must be a bool, got {type(self.eos).__name__}")
        object.__setattr__(self, "eos", bool(self.eos))

    @property
    def horizon(self) -> int:
        """``T``: the number of decisions, i.e. the length of the stored token array."""
        return self.length + 1 if self.eos else self.length

    @property
    def num_actions(self) -> int:
        """``A``: ``V + 1`` with EOS, else ``V``."""
        return self.vocab_size + 1 if self.eos else self.vocab_size

    @property
    def eos_id(self) -> int | None:
        """The end token's id ``V``, or None in a fixed-length space."""
        return self.vocab_size if self.eos else None

    @property
    def eos_sentinel(self) -> int:
        """The EOS id, or −1 (an id no token has) in a fixed-length space: ``tokens ==
        space.eos_sentinel`` marks where a response ends in either kind of space."""
        return self.vocab_size if self.eos else -1

    @property
    def num_sequences(self) -> int:
        """``V^T`` (fixed length) or ``sum_{k<=L} V^k = (V^T - 1)/(V - 1)`` (variable length)."""
        V, L = self.vocab_size, self.length
        if not self.eos:
            return V**L
        return L + 1 if V == 1 else (V ** (L + 1) - 1) // (V - 1)

    def action_mask(self) -> np.ndarray:
        """Allowed actions per decision, bool ``[T, A]``; only EOS at a variable space's last."""
        mask = np.ones((self.horizon, self.num_actions), dtype=bool)
        if self.eos:
            mask[-1, : self.vocab_size] = False
        return mask

    def continuing_actions(self) -> np.ndarray:
        """bool ``[A]``: the actions after which a response goes on (every action but EOS)."""
        return np.arange(self.num_actions) != self.eos_sentinel

    def first_eos(self, tokens) -> jax.Array:
        """The position of the first EOS in each row, int ``[...]`` (``T`` where there is none,
        and in a fixed-length space): one min-reduction, not a cumulative sum over time."""
        tokens = jnp.asarray(tokens)
        length = tokens.shape[-1]
        if not self.eos:
            return jnp.full(tokens.shape[:-1], length, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        return jnp.min(jnp.where(tokens == self.vocab_size, positions, length), -1)

    def active(self, tokens) -> jax.Array:
        """Positions that count, bool ``[..., T]``: up to and including the first EOS."""
        tokens = jnp.asarray(tokens)
        if not self.eos:
            return jnp.ones(tokens.shape, bool)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        return positions <= self.first_eos(tokens)[..., None]

    def after_eos(self, tokens, scores) -> jax.Array:
        """Per-position ``scores [..., T]`` with the support's rules applied entry by entry, so
        that their sum is −∞ exactly for the arrays that are not sequences of the space.

        Ids outside ``[0, A)`` become −∞ wherever they are. With EOS, positions after the first
        EOS become 0 if they hold EOS and −∞ otherwise, and a last entry other than EOS is −∞
        (a response ends by the horizon).
        """
        tokens = jnp.asarray(tokens)
        in_range = (tokens >= 0) & (tokens < self.num_actions)
        if not self.eos:
            return jnp.where(in_range, scores, -jnp.inf)
        is_eos = tokens == self.eos_id
        active = self.active(tokens)
        before_last = jnp.broadcast_to(
            jnp.arange(tokens.shape[-1]) < self.horizon - 1, is_eos.shape
        )
        ok = in_range & (active | is_eos) & (before_last | is_eos)
        return jnp.where(ok, jnp.where(active, scores, 0), -jnp.inf)

    def mask_logits(self, logits, table: bool = False) -> jax.Array:
        """−∞ on every non-EOS action at a variable-length space's last decision.

        ``logits`` is ``[..., T, A]``, or a lattice table ``[T, S, A]`` when ``table``.
        """
        logits = jnp.asarray(logits)
        if not self.eos:
            return logits
        mask = self.action_mask()
        allowed = jnp.broadcast_to(mask[:, None, :] if table else mask, logits.shape)
        return jnp.where(allowed, logits, -jnp.inf)

    def enumerate(self, max_sequences: int = MAX_ENUMERATE) -> np.ndarray:
        """Every sequence of the space, int32 ``[N, T]``, ``N = num_sequences``.

        Order: by response length (shortest first), then lexicographically; EOS pads the tail.

        Raises:
            ValueError: if ``num_sequences > max_sequences`` (default ``MAX_ENUMERATE``).
        """
        if self.num_sequences > max_sequences:
            raise ValueError(
                f"space has {self.num_sequences} sequences, more than max_sequences="
                f"{max_sequences}; use a lattice (DP) or a Monte Carlo method instead"
            )
        lengths = range(self.length + 1) if self.eos else [self.length]
        blocks = []
        for k in lengths:
            body = np.array(list(itertools.product(range(self.vocab_size), repeat=k)), np.int32)
            body = body.reshape(self.vocab_size**k, k)
            pad = np.full((body.shape[0], self.horizon - k), self.vocab_size, np.int32)
            blocks.append(np.concatenate([body, pad], axis=1))
        return np.concatenate(blocks, axis=0)

    def validate(self, tokens, name: str = "tokens") -> np.ndarray:
        """Checks a token array ``[..., T]`` and returns it as a NumPy int array.

        Raises:
            ValueError: non-integer dtype, a last dimension other than ``T``, an id outside the
                action set, EOS in a fixed-length space, a non-EOS token after EOS, or no EOS by
                the horizon; the message names the argument, the first bad index and its value.
        """
        y = _concrete(tokens, name)
        if y.ndim == 0 or y.shape[-1] != self.horizon:
            raise ValueError(
                f"{name} must have last dimension T={self.horizon}, got shape {y.shape}"
            )
        _check_ids(y, name, 0, self.num_actions - 1, self._fixed_eos_hint())
        if self.eos:
            is_eos = y == self.vocab_size
            after_eos = np.cumsum(is_eos, axis=-1) - is_eos > 0
            bad = after_eos & ~is_eos
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"{name}{list(idx)} = {int(y[idx])} follows EOS ({self.vocab_size}); "
                    "every entry after the first EOS must be EOS"
                )
            missing = ~is_eos[..., -1]
            if missing.any():
                idx = tuple(int(i) for i in np.argwhere(missing)[0])
                raise ValueError(
                    f"{name}{list(idx)} has no EOS by the horizon T={self.horizon}: a response "
                    f"holds at most L={self.length} tokens, then EOS={self.vocab_size}"
                )
        return y

    def validate_prompt(self, prompt, name: str = "prompt") -> np.ndarray | None:
        """Checks a prompt ``[..., P]`` of vocabulary ids (no EOS); returns it as NumPy or None."""
        if prompt is None:
            return None
        x = _concrete(prompt, name)
        if x.ndim == 0:
            raise ValueError(f"{name} must have a last (length) dimension, got a scalar")
        _check_ids(x, name, 0, self.vocab_size - 1, "prompts hold vocabulary ids only (no EOS)")
        return x

    def _fixed_eos_hint(self) -> str:
        if self.eos:
            return ""
        return f"a fixed-length space has no EOS: id {self.vocab_size} is not allowed"


def _concrete(array, name: str) -> np.ndarray:
    if isinstance(array, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete array to validate, got a traced value")
    y = np.asarray(as_array(name, array))  # a ragged nested list: ValueError naming `name`
    if y.size == 0 and y.dtype == np.float64:  # `[]` is an empty sequence of ids
        y = y.astype(np.int32)
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {y.dtype}")
    return y


def _check_ids(y: np.ndarray, name: str, low: int, high: int, hint: str = "") -> None:
    bad = (y < low) | (y > high)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        extra = f" ({hint})" if hint and int(y[idx]) == high + 1 else ""
        raise ValueError(f"{name}{list(idx)} = {int(y[idx])} is not in [{low}, {high}]{extra}")
