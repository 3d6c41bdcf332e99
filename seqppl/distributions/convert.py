"""Exact conversions: ``to_ebm`` (M⁻¹, always) and ``to_arm`` (M, when the EBM has a route).

``p_q = p_{R_r}`` for ``q = M(r)``, and ``V_q(x) = A(x)``
(docs/theory.md#the-soft-bellman-bijection).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from seqppl.bellman import inverse_soft_bellman, soft_bellman
from seqppl.distributions.arm import ARM
from seqppl.distributions.ebm import EBM
from seqppl.distributions.parts import PathRewards, ReferenceLogProb
from seqppl.distributions.routes import ExactRoute, NoExactARM
from seqppl.distributions.support import map_over_batch
from seqppl.lattice import MAX_PREFIX_TREE_CELLS, Lattice
from seqppl.tables import table_batch_shape

__all__ = ["to_arm", "to_ebm", "no_exact_arm_reason"]


def to_ebm(arm: ARM, normalized: bool = False) -> EBM:
    """The EBM of the same distribution as ``arm``.

    ``normalized=False`` (M⁻¹): ``R = Σ_t r_t`` with ``r = M⁻¹(q)`` of the raw logits, so
    ``A(x) = V_q(x)``, the root logsumexp of the logits, which is not 0 unless the logits are
    normalised: ``log_partition()`` is that value, not a log-probability. ``normalized=True``:
    ``R(y) = log p_q(y)``, so ``log Z = 0`` and any constraint added later has
    ``log Z = log P_q(constraint)`` (``arm.constrain`` does this). Table ARMs give a table EBM on
    the same lattice either way; any other ARM gives the path-wise M⁻¹ (one logits evaluation
    per sequence, ``path_rewards``) or its ``log_prob``. Nothing is validated again.

    Example:
        >>> import jax.numpy as jnp
        >>> from seqppl import SequenceSpace, Lattice, ARM
        >>> arm = ARM.from_table(Lattice.markov(SequenceSpace(2, 2), 0), jnp.array([[0.0, 1.0]]))
        >>> ebm = to_ebm(arm)
        >>> y = jnp.array([1, 0])
        >>> bool(jnp.allclose(ebm.log_prob(y), arm.log_prob(y)))
        True
        >>> abs(float(to_ebm(arm, normalized=True).log_partition())) < 1e-12
        True
    """
    if not isinstance(arm, ARM):
        raise TypeError(f"to_ebm takes an ARM, got {type(arm).__name__}")
    if not isinstance(normalized, bool):
        raise TypeError(f"normalized must be True or False, got {normalized!r}")
    if normalized:
        return EBM.from_parts((ReferenceLogProb(arm),), arm.space, arm.prompt, arm._validate_args)
    if arm.lattice is None:
        return EBM.from_parts((PathRewards(arm),), arm.space, arm.prompt, arm._validate_args)
    lat = arm.lattice
    r = map_over_batch(
        lambda q, prompt: inverse_soft_bellman(lat, q, prompt=prompt, trusted=True),
        arm.batch_shape if table_batch_shape(arm.params) else (),  # one table: one M⁻¹
        arm.params,
        arm.prompt,
    )
    return EBM.from_table(lat, r, arm.prompt, validate_args=arm._validate_args, trusted=True)


def no_exact_arm_reason(ebm: EBM) -> str | None:
    """Why ``to_arm(ebm)`` has no exact route, or None when it has one: the DP and ARM routes
    always do; the enumeration route when the prefix tree fits ``MAX_PREFIX_TREE_CELLS`` and the
    prompt is unbatched."""
    route = ebm.exact_route
    if route in (ExactRoute.DYNAMIC_PROGRAM, ExactRoute.ARM):
        return None
    space = ebm.space
    tree_cells = sum(space.vocab_size**d for d in range(space.horizon)) * space.num_actions
    if route is ExactRoute.ENUMERATION and tree_cells <= MAX_PREFIX_TREE_CELLS:
        if not ebm.batch_shape:
            return None
        return "its prompt is batched (give one prompt at a time)"
    return (
        f"its parts are not all on lattices and its prefix tree is too large ({tree_cells} "
        "cells); approximate it with sp.distill(ebm, student_arm, ...)"
    )


def to_arm(ebm: EBM) -> ARM:
    """The ARM ``q = M(r)`` with ``p_q = p_R``, along ``ebm.exact_route``.

    DP route: M on the product lattice of the parts (computed once per EBM). ARM route: the ARM
    the EBM came from. Enumeration route, on spaces whose prefix tree fits
    ``MAX_PREFIX_TREE_CELLS`` (unbatched prompts): ``R(y)`` is put on each sequence's final
    action of the prefix tree and M is applied there.

    Raises:
        NoExactARM: (a ``ValueError``) no route; the message points to ``sp.distill``.
    """
    if not isinstance(ebm, EBM):
        raise TypeError(f"to_arm takes an EBM, got {type(ebm).__name__}")
    reason = no_exact_arm_reason(ebm)
    if reason is not None:
        raise NoExactARM(f"no exact ARM for this EBM: {reason}")
    route = ebm.exact_route
    if route is ExactRoute.DYNAMIC_PROGRAM:
        return ARM.from_table(
            ebm.joint, ebm.exact_logits(), ebm.prompt, validate_args=ebm._validate_args,
            trusted=True,
        )  # fmt: skip
    if route is ExactRoute.ARM:
        return ebm.parts[0].arm
    space = ebm.space
    tree = Lattice.prefix_tree(space)
    seqs = space.enumerate()
    last = np.asarray(space.active(seqs)).sum(-1) - 1  # index of each sequence's final action
    states = np.asarray(tree.states(seqs))
    rows = np.arange(len(seqs))
    r = jnp.zeros((space.horizon, tree.num_states, space.num_actions))
    r = r.at[last, states[rows, last], seqs[rows, last]].set(
        ebm.unnormalized_log_prob(jnp.asarray(seqs))
    )
    q, _ = soft_bellman(tree, r, trusted=True)
    return ARM.from_table(tree, q, ebm.prompt, validate_args=ebm._validate_args, trusted=True)
