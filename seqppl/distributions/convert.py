"""Exact conversions: ``to_ebm`` (M⁻¹, always) and ``to_arm`` (M, on lattices or small spaces).

THEORY §2: ``p_q = p_{R_r}`` for ``q = M(r)``, and ``V_q(x) = A(x)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from seqppl.bellman import inverse_soft_bellman, soft_bellman
from seqppl.distributions.arm import ARM
from seqppl.distributions.ebm import EBM
from seqppl.distributions.support import batch_shape_of, map_over_batch
from seqppl.lattice import MAX_PREFIX_TREE_CELLS, Lattice

__all__ = ["to_arm", "to_ebm", "NoExactARM"]


class NoExactARM(ValueError):
    """``to_arm`` has no exact route for this EBM (not a lattice, prefix tree too large)."""


def to_ebm(arm: ARM) -> EBM:
    """The EBM with ``R = Σ_t r_t``, ``r = M⁻¹(q)``: the same distribution, ``A(x) = V_q(x)``.

    Table ARMs give a table EBM on the same lattice; any other ARM gives the path-wise M⁻¹
    (one logits evaluation per sequence, ``path_rewards``).

    Example:
        >>> import jax.numpy as jnp
        >>> from seqppl import SequenceSpace, Lattice, ARM
        >>> arm = ARM.from_table(Lattice.markov(SequenceSpace(2, 2), 0), jnp.array([[0.0, 1.0]]))
        >>> ebm = to_ebm(arm)
        >>> y = jnp.array([1, 0])
        >>> bool(jnp.allclose(ebm.log_prob(y), arm.log_prob(y)))
        True
    """
    if not isinstance(arm, ARM):
        raise TypeError(f"to_ebm takes an ARM, got {type(arm).__name__}")
    if arm.lattice is not None:
        lat = arm.lattice
        r = map_over_batch(
            lambda q, prompt: inverse_soft_bellman(lat, q, prompt=prompt),
            arm.batch_shape if batch_shape_of(arm.params) else (),  # one table: one M⁻¹
            arm.params,
            arm.prompt,
        )
        return EBM.from_table(arm.lattice, r, arm.prompt, validate_args=arm._validate_args)
    return EBM._build(arm.space, arm.prompt, [("path", 1.0, arm, None, None)], arm._validate_args)


def to_arm(ebm: EBM) -> ARM:
    """The ARM ``q = M(r)`` with ``p_q = p_R``: exact on lattice EBMs and enumerable spaces.

    Lattice EBMs: M on the product lattice of their parts. Otherwise, on spaces whose prefix tree
    fits ``MAX_PREFIX_TREE_CELLS``: ``R(y)`` is put on each sequence's final action of the prefix
    tree and M is applied there (unbatched prompts only).

    Raises:
        ValueError: neither applies; the message points to ``sp.distill``.
    """
    if not isinstance(ebm, EBM):
        raise TypeError(f"to_arm takes an EBM, got {type(ebm).__name__}")
    if ebm.is_lattice:
        table = ebm.reward_table()
        q = map_over_batch(
            lambda r, _: soft_bellman(ebm.joint, r)[0], batch_shape_of(table), table, None
        )
        return ARM.from_table(ebm.joint, q, ebm.prompt, validate_args=ebm._validate_args)
    space = ebm.space
    tree_cells = sum(space.vocab_size**d for d in range(space.horizon)) * space.num_actions
    if tree_cells > MAX_PREFIX_TREE_CELLS or ebm.batch_shape:
        raise NoExactARM(
            "no exact ARM for this EBM: its parts are not all on lattices and its prefix tree is "
            f"too large ({tree_cells} cells) or its prompt is batched; approximate it with "
            "sp.distill(ebm, student_arm, ...)"
        )
    tree = Lattice.prefix_tree(space)
    seqs = space.enumerate()
    last = np.asarray(space.active(seqs)).sum(-1) - 1  # index of each sequence's final action
    states = np.asarray(tree.states(seqs))
    rows = np.arange(len(seqs))
    r = jnp.zeros((space.horizon, tree.num_states, space.num_actions))
    r = r.at[last, states[rows, last], seqs[rows, last]].set(
        ebm.unnormalized_log_prob(jnp.asarray(seqs))
    )
    q, _ = soft_bellman(tree, r)
    return ARM.from_table(tree, q, ebm.prompt, validate_args=ebm._validate_args)
