"""``constraint_report``: how far a constrained decoder is from the conditional it stands for.

The target is the base ARM conditioned on the constraint, ``p*(y) ∝ p_arm(y) · 1[y accepted]``
(``arm.constrain(dfa)``; ``to_arm`` of it is the exact decoder M). Next to ``distillation_error``'s
figures (both KLs, TV, the per-position KL; by enumeration), the report gives what a decoder's
user sees, each exact by one dynamic program: the occupancy ``μ_t(u, a)`` of the decoder on its
lattice paired with the DFA (docs/theory.md#occupancy-and-gradients), ``d(u)`` the DFA state of
``u`` and ``F`` the accepting states:

- ``p_invalid = Σ_{t, u: d(u) ∉ F} μ_t(u, EOS)`` (fixed length:
  ``Σ_{δ(d(u), a) ∉ F} μ_{T-1}(u, a)``);
- ``p_length_limit = Σ_{u: d(u) ∉ F} μ_{T-1}(u, EOS)``: the response ran to the length limit
  without being accepted (fixed length: every output has the full length, so ``p_invalid``);
- ``expected_length = Σ_t t · Σ_u μ_t(u, EOS)`` tokens (``T`` in a fixed-length space);
- the probability of each option of an option set, ``P(y spells o) = exp log Z`` of the model
  constrained by ``options_lattice`` (every tokenisation of ``o`` counts): the first-token bias
  of a masking decoder shows here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.bellman import occupancy
from seqppl.checks import check_model
from seqppl.distillation_report import distillation_error
from seqppl.distributions import ARM, to_arm, to_ebm
from seqppl.lattice import Lattice
from seqppl.masking import accepting_states, component_states
from seqppl.options import options_lattice
from seqppl.report import DistillationReport

__all__ = ["constraint_report", "ConstraintReport", "ending_figures", "occupancy_endings"]


@dataclasses.dataclass(frozen=True)
class ConstraintReport:
    """A constrained decoder against the exact conditional ``p* ∝ p_arm · 1[accepted]``.

    Attributes:
        distillation: ``distillation_error(target, decoder, "exact")``: both KLs, TV, the
            per-position KL, ε (``kl_reverse`` is ∞ when the decoder emits invalid outputs).
        log_p_accepted: ``log P_arm(y accepted)``, the target's ``log Z``.
        p_invalid: the decoder's probability of an output the DFA rejects.
        p_length_limit: its probability of reaching the length limit unaccepted (forced EOS).
        expected_length, target_expected_length: mean number of tokens before EOS.
        option_probabilities, target_option_probabilities: ``{option: P(y spells it)}`` under
            the decoder and the target (empty without ``options``).
    """

    distillation: DistillationReport
    log_p_accepted: float
    p_invalid: float
    p_length_limit: float
    expected_length: float
    target_expected_length: float
    option_probabilities: dict = dataclasses.field(default_factory=dict)
    target_option_probabilities: dict = dataclasses.field(default_factory=dict)

    @property
    def kl_reverse(self) -> float:
        """``KL(p_decoder ‖ p*)``."""
        return self.distillation.kl_reverse

    @property
    def kl_forward(self) -> float:
        """``KL(p* ‖ p_decoder)``."""
        return self.distillation.kl_forward

    @property
    def tv(self) -> float:
        """Total variation between the decoder and the target."""
        return self.distillation.tv

    @property
    def per_position_kl(self) -> np.ndarray | None:
        """``[T]``: position t's share of ``kl_reverse``."""
        return self.distillation.per_position_kl

    def attrs(self) -> dict:
        """The distillation report's flat dict plus this report's scalars (options as
        ``p_option[text]`` and ``target_p_option[text]``)."""
        out = self.distillation.attrs()
        for field in ("log_p_accepted", "p_invalid", "p_length_limit", "expected_length"):
            out[field] = float(getattr(self, field))
        out["target_expected_length"] = float(self.target_expected_length)
        for option, p in self.option_probabilities.items():
            out[f"p_option[{option}]"] = float(p)
            out[f"target_p_option[{option}]"] = float(self.target_option_probabilities[option])
        return out

    def __str__(self) -> str:
        lines = [
            f"constraint report (P_arm(accepted) = {np.exp(self.log_p_accepted):.6g})",
            f"  KL(decoder ‖ target) = {self.kl_reverse:.6g}, KL(target ‖ decoder) = "
            f"{self.kl_forward:.6g}, TV = {self.tv:.6g}",
            f"  P(invalid output) = {self.p_invalid:.6g}; P(length limit, not accepted) = "
            f"{self.p_length_limit:.6g}",
            f"  expected length: decoder {self.expected_length:.4g}, target "
            f"{self.target_expected_length:.4g}",
        ]
        for option, p in self.option_probabilities.items():
            exact = self.target_option_probabilities[option]
            lines.append(f"  P({option!r}): decoder {p:.4g}, target {exact:.4g}")
        return "\n".join(lines)


def constraint_report(
    decoder: ARM, arm: ARM, dfa: Lattice, accepting=None, *, options=None, tokens=None
) -> ConstraintReport:
    """The distortion of ``decoder`` (e.g. ``masked_arm(arm, dfa, ...)``) against the exact
    conditional ``arm.constrain(dfa, accepting)``, every figure exact.

    Args:
        decoder: an ARM over the space and prompt of ``arm`` (a table ARM, or a callable ARM on
            an enumerable space, read through its prefix tree).
        arm: the base ARM (batch shape ``()``) whose conditional is the target.
        dfa: the constraint; ``accepting`` its accepting states (default ``dfa.accepting``).
        options: optional list of strings (with ``tokens``) or token-id sequences: their
            probabilities under both models (``options_lattice``).
        tokens: the text of each token id (a sequence of V strings or a tokenizer).

    Returns:
        a ``ConstraintReport``.

    Raises:
        ValueError: the arm accepts no output (``P_arm(accepted) = 0``), a space too large to
            enumerate, or the models differ in space or prompt.

    Example:
        >>> from seqppl import SequenceSpace, Lattice, ARM, masked_arm
        >>> space = SequenceSpace(vocab_size=2, length=2, eos=True)
        >>> base = ARM.from_table(Lattice.markov(space, 0), jnp.zeros((1, 3)))
        >>> dfa = Lattice.automaton(space, [[1, 0], [1, 1]], accepting=[1])  # "has a 0"
        >>> report = constraint_report(masked_arm(base, dfa, "myopic"), base, dfa)
        >>> round(report.p_invalid, 4), round(report.p_length_limit, 4)
        (0.25, 0.25)
    """
    check_model(arm, ARM, arm, "arm")
    check_model(decoder, ARM, arm, "decoder")
    target = arm.constrain(dfa, accepting)
    log_p_accepted = float(target.log_partition())
    if log_p_accepted == -np.inf:
        raise ValueError("arm gives the constraint probability 0: no output is accepted")
    distillation = distillation_error(target, decoder, "exact")
    exact = to_arm(target)
    table = decoder if decoder.lattice is not None else to_arm(to_ebm(decoder, normalized=True))
    p_invalid, p_limit, length = ending_figures(table, dfa, accepting)
    chosen, wanted = {}, {}
    for option in [] if options is None else list(options):
        key = option if isinstance(option, str) else tuple(int(v) for v in option)
        spelled = options_lattice(arm.space, [option], tokens)
        chosen[key], wanted[key] = (_probability(m, spelled) for m in (decoder, exact))
    return ConstraintReport(
        distillation=distillation,
        log_p_accepted=log_p_accepted,
        p_invalid=p_invalid,
        p_length_limit=p_limit,
        expected_length=length,
        target_expected_length=ending_figures(exact, dfa, accepting)[2],
        option_probabilities=chosen,
        target_option_probabilities=wanted,
    )


def ending_figures(model: ARM, dfa: Lattice, accepting=None) -> tuple[float, float, float]:
    """``(p_invalid, p_length_limit, expected_length)`` of a table ARM (batch shape ``()``)
    under the constraint ``dfa`` (``accepting`` default ``dfa.accepting``): the module
    docstring's sums over its occupancy on its lattice paired with ``dfa``."""
    if model.lattice is None:
        raise ValueError("ending_figures needs a table ARM; constraint_report reads any ARM")
    lat = model.lattice
    states = component_states(lat, dfa)
    if states is None:
        lat = lat.product(dfa)
        states = np.tile(np.arange(dfa.num_states), model.lattice.num_states)
    return occupancy_endings(_occupancy(model, lat), states, dfa, accepting)


def occupancy_endings(mu, states, dfa: Lattice, accepting=None) -> tuple[float, float, float]:
    """``ending_figures`` from an occupancy ``mu`` float ``[T, S, A]`` (``sp.occupancy`` of a
    table ARM) on a lattice whose states are in DFA state ``states`` int ``[S]``."""
    accept = accepting_states(dfa, accepting)
    space, mu, states = dfa.space, np.asarray(mu, np.float64), np.asarray(states)
    if not space.eos:
        bad = ~accept[dfa.delta[states]]  # [S, A]: the last token leaves the DFA outside F
        p_invalid = float(mu[-1][bad].sum())
        return p_invalid, p_invalid, float(space.length)
    ends = mu[:, :, space.eos_id]  # [T, S]: the response ends at decision t in state u
    bad = ~accept[states]
    length = float(np.arange(space.horizon) @ ends.sum(1))
    return float(ends[:, bad].sum()), float(ends[-1, bad].sum()), length


@functools.partial(jax.jit, static_argnames="lat")
def _occupancy(model: ARM, lat: Lattice) -> jax.Array:
    """The occupancy of a table ARM on ``lat`` (its lattice, or its lattice times another),
    in one compiled program (the eager form dispatches many small ones)."""
    log_pi = model.log_policy_table()
    if lat is not model.lattice:
        log_pi = lat.lift(log_pi, 0)
    return occupancy(lat, log_pi, model.prompt, trusted=True)


def _probability(model: ARM, spelled: Lattice) -> float:
    """``P_model(y accepted by spelled)``, by the DP (or enumeration) of ``arm.constrain``."""
    return float(jnp.exp(to_ebm(model, normalized=True).constrain(spelled).log_partition()))
