"""The distortion of masking decoders by dynamic programming: ``sp.constraint_report``'s figures
on spaces too large to enumerate.

A decoder ``q`` (``sp.masked_arm``) and the exact decoder ``p* = M(base × dfa)`` are table ARMs
on the same product lattice, kept to its reachable states (``reachable_product``: a bigram pairs
a DFA state with the few tokens that lead into it). With the state occupancies
``m_t(s) = Σ_a μ_t(s, a)`` of each (``sp.occupancy``) the chain rule gives both KLs exactly:

    KL(q ‖ p*) = Σ_t Σ_s m^q_t(s) KL(π_q(·|s) ‖ π_*(·|s))      (term t: the per-position KL)
    KL(p* ‖ q) = Σ_t Σ_s m^*_t(s) KL(π_*(·|s) ‖ π_q(·|s))

Where responses end, ``e_t(d) = Σ_{s in DFA state d} μ_t(s, EOS)`` ``[T, S_dfa]``, gives
P(invalid), P(length limit) and the expected length (``occupancy_endings``) and, on an option
trie (``options_lattice``), each option's probability ``Σ_t e_t(d_o)``. TV is no sum over
positions (``models.tv_bounds``): exact when the accepted sequences are few, else bracketed by
enumerated prefixes; the TV of (length, final DFA state), read off ``e``, is a lower bound too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from seqppl.models.tv_bounds import accepted_sequences, accepted_tv, tv_bounds

import seqppl as sp
from seqppl.constraints import co_reachable
from seqppl.distillation_report import occupancy_terms
from seqppl.masking_report import ConstraintReport, occupancy_endings

__all__ = ["Distortion", "distortion_reports", "reachable_product", "DECODERS"]

DECODERS = ("myopic", "feasible", "exact")
"""The decoders each constraint is decoded with: ``sp.masked_arm``'s two modes and exact M."""


class Distortion(NamedTuple):
    """One decoder against the conditional: the ``ConstraintReport`` (its ``tv`` None when only
    bounded), ``tv_low ≤ TV ≤ tv_high`` (both the TV when exact) and the ending probabilities
    ``endings: float [T, S_dfa]`` (``e_t(d)``, module docstring); ``num_states``: the states
    of base × DFA the decoders run on (reachable ones and one dead state)."""

    report: ConstraintReport
    tv_low: float
    tv_high: float
    endings: np.ndarray
    num_states: int


def distortion_reports(
    base: sp.ARM,
    dfa: sp.Lattice,
    *,
    options=None,
    max_accepted: int = 20_000,
    num_states: int | None = None,
) -> dict[str, Distortion]:
    """``{decoder: Distortion}`` for ``DECODERS`` under ``dfa``, every figure exact (DP).

    Args:
        base: a table ARM (batch shape ``()``, no prompt) whose conditional is the target.
        dfa: the constraint with its ``accepting`` states.
        options: optional ``{text: DFA state}``, the accepting state of ``dfa`` (an option
            trie, ``seqppl.options.options_lattice``) that spells each option.
        max_accepted: TV is exact when at most this many token sequences are accepted
            (otherwise bounded, and exact when the prefixes of both models can be enumerated).
        num_states: pads the product lattice to this many states (``reachable_product``).

    Returns:
        the three decoders' ``Distortion``; the exact decoder's KLs are 0 up to rounding.

    Example:
        >>> space = sp.SequenceSpace(vocab_size=2, length=2, eos=True)
        >>> base = sp.ARM.from_table(sp.Lattice.markov(space, 0), jnp.zeros((1, 3)))
        >>> dfa = sp.Lattice.automaton(space, [[1, 0], [1, 1]], accepting=[1])  # "has a 0"
        >>> out = distortion_reports(base, dfa)
        >>> [round(out[d].report.p_invalid, 3) for d in DECODERS], round(out["feasible"].tv_low, 3)
        ([0.25, 0.0, 0.0], 0.25)
    """
    lat, on_lat, states, reachable = reachable_product(base, dfa, num_states)
    target = on_lat.constrain(lat)
    log_p_accepted = float(target.log_partition())
    if log_p_accepted == -np.inf:
        raise ValueError("base gives the constraint probability 0: no output is accepted")
    models = {mode: sp.masked_arm(on_lat, lat, mode) for mode in DECODERS[:2]}
    models["exact"] = sp.to_arm(target)
    space = dfa.space
    for mode, model in models.items():
        if model.lattice is not lat:
            raise ValueError(f"the {mode} decoder is not on the product lattice")
    policies = {mode: model.log_policy_table() for mode, model in models.items()}
    occupancies = {mode: sp.occupancy(lat, log_pi) for mode, log_pi in policies.items()}
    host = {mode: np.asarray(log_pi) for mode, log_pi in policies.items()}
    delta, initial = np.asarray(lat.delta), int(lat.initial)
    accepted = accepted_sequences(dfa, max_accepted)
    target_endings = _endings(occupancies["exact"], states, dfa.num_states, space.eos_id)
    target_length = occupancy_endings(occupancies["exact"], np.arange(lat.num_states), lat)[2]
    out = {}
    for mode in DECODERS:
        if mode == "feasible" and np.array_equal(host["feasible"], host["myopic"]):
            out[mode] = out["myopic"]  # no state where the horizon binds: the same decoder
            continue
        mu = occupancies[mode]
        per_reverse, per_forward, eps = (
            np.asarray(x, np.float64)
            for x in _position_terms(policies[mode], policies["exact"], mu, occupancies["exact"])
        )
        endings = _endings(mu, states, dfa.num_states, space.eos_id)
        args = (host[mode], host["exact"], delta, initial)
        if mode == "exact":
            tv = low = high = 0.0  # the target itself
        elif accepted is not None:
            tv = low = high = accepted_tv(*args, accepted, space.eos_id)
        else:
            low, high = tv_bounds(*args, space.eos_id)
            low = max(low, 0.5 * float(np.abs(endings - target_endings).sum()))
            tv = low if high - low < 1e-9 else None
        p_invalid, p_limit, length = occupancy_endings(mu, np.arange(lat.num_states), lat)
        notes = () if tv is not None else (f"TV in [{low:.4g}, {high:.4g}] (bounds)",)
        distillation = sp.DistillationReport.from_positions(
            per_reverse, per_forward, float(eps), tv=tv, notes=notes
        )
        report = ConstraintReport(
            distillation,
            log_p_accepted,
            p_invalid,
            p_limit,
            length,
            target_length,
            {o: float(endings[:, d].sum()) for o, d in (options or {}).items()},
            {o: float(target_endings[:, d].sum()) for o, d in (options or {}).items()},
        )
        out[mode] = Distortion(report, low, high, endings, reachable)
    return out


_position_terms = jax.jit(occupancy_terms)


def _endings(mu, states, num_dfa_states: int, eos_id: int) -> np.ndarray:
    """``e_t(d)`` float64 ``[T, S_dfa]``: the probability that the response ends (EOS) at
    decision t in DFA state d."""
    ends = np.asarray(mu[:, :, eos_id], np.float64)  # [T, S]
    out = np.zeros((ends.shape[0], num_dfa_states))
    np.add.at(out.T, states, ends.T)
    return out


def reachable_product(base: sp.ARM, dfa: sp.Lattice, num_states: int | None = None):
    """``(lattice, base on it, dfa_states int [S], number of states before padding)``:
    ``base.lattice × dfa`` restricted to the
    pairs reachable from the initial pair, every pair whose DFA state cannot accept merged into
    one absorbing dead state (last), as an automaton lattice with its accepting states.

    It accepts what ``dfa`` accepts and a state can still reach acceptance exactly when its DFA
    state can, so ``sp.masked_arm(base_on_it, lattice, mode)`` is ``sp.masked_arm(base, dfa,
    mode)`` and ``to_arm(base_on_it.constrain(lattice))`` is the exact decoder, on far fewer
    states (a bigram over V tokens pairs a DFA state with the few tokens that lead into it,
    not with all V + 1). ``num_states`` pads it with unreachable states (equal shapes, one
    compilation); ``dfa_states[s]`` is the DFA state of ``s`` (the first dead one for the dead
    state and the padding).
    """
    if base.lattice is None or base.prompt is not None or base.batch_shape != ():
        raise ValueError("base must be a table ARM without a prompt or batch shape")
    space = dfa.space
    V = space.vocab_size
    accept = np.asarray(dfa.accepting)
    live = co_reachable(np.asarray(dfa.delta)[:, :V], accept)
    if not live[dfa.initial]:
        raise ValueError("the dfa accepts nothing")
    dead_dfa = int(np.flatnonzero(~live)[0]) if (~live).any() else dfa.initial
    first, second = np.asarray(base.lattice.delta)[:, :V], np.asarray(dfa.delta)[:, :V]
    pairs = [(int(base.lattice.initial), int(dfa.initial))]
    index, rows = {pairs[0]: 0}, []
    for u, d in pairs:  # breadth first; -1 marks the dead state until it is numbered
        row = []
        for nxt in zip(first[u].tolist(), second[d].tolist(), strict=True):
            if not live[nxt[1]]:
                row.append(-1)
                continue
            if nxt not in index:
                index[nxt] = len(pairs)
                pairs.append(nxt)
            row.append(index[nxt])
        rows.append(row)
    size = max(len(pairs) + 1, num_states or 0)
    delta = np.repeat(np.arange(size)[:, None], V, axis=1)  # dead and padding: absorbing
    delta[: len(pairs)] = np.where(np.array(rows) < 0, len(pairs), rows)
    u = np.array([p[0] for p in pairs] + [pairs[0][0]] * (size - len(pairs)))
    d = np.array([p[1] for p in pairs] + [dead_dfa] * (size - len(pairs)))
    lat = sp.Lattice.automaton(
        space, delta, 0, accepting=accept[d] & (np.arange(size) < len(pairs))
    )
    table = jnp.take(jnp.asarray(base.params), jnp.asarray(u), axis=-2)
    return lat, sp.ARM.from_table(lat, table), d, len(pairs) + 1
