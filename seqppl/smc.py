"""Sequential Monte Carlo over positions for ``log Z`` with an ARM proposal and optional twists.

Intermediate targets on prefixes: ``γ_t(y_{≤t}) = exp Φ_t(y_{≤t})`` for ``t < T − 1`` and
``γ_{T−1}(y) = exp R(y)``, where the twist ``Φ_t`` estimates ``log Σ_{y' ⊒ y_{≤t}} exp R(y')``:

- ``twist=None``: ``Φ_t = log q(y_{≤t})`` (no lookahead: all weight arrives at the end);
- ``twist="exact"``: a lattice EBM's accumulated local rewards plus the soft value of the
  state reached, ``Φ_t = Σ_{k≤t} r_k + V[t+1, s_{t+1}]`` (docs/theory.md#sequential-monte-carlo):
  exact prefix marginals;
- ``twist=approx``, an EBM on lattices over the same space (e.g. an n-gram fit to a neural
  proposal, times the constraint's DFA): the same ``Φ_t`` of ``approx`` — the exact twist of an
  approximation of the target, for targets with no dynamic program (a neural base × a
  constraint); carried along each particle's lattice state, one lookup per step;
- a callable ``twist_fn(tokens [P, T]) -> [P, T]``, causal, entry t for ``y[:t+1]`` (a learned
  value function ``V(prefix)`` in this total form).

Particle i at step t gets the incremental weight ``Φ_t − Φ_{t−1} − log π(y_t | y_{<t})``;
when the Kish ESS falls below ``ess_threshold · P`` the particles are resampled (multinomial,
stratified or systematic) and ``log Ẑ`` gains ``log mean w``. Particles with weight 0 (a
forbidden prefix) are never resampled, so they drop out without stopping the run. The forced
EOS of the last decision belongs to both proposal and target, so the horizon adds no bias.
``Ẑ`` is unbiased; ``num_replicates`` independent runs give the standard error. With
``twist="exact"`` and ``proposal = to_arm(ebm)`` every increment is 0 after the first, which
is ``log Z``: the estimate is exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.bellman import soft_values
from seqppl.checks import (
    check_choice,
    check_counts,
    check_mesh,
    check_model,
    check_number,
    refuse_invalid,
)
from seqppl.diagnostics import (
    kish_ess,
    sequence_khat,
    tail_note,
    tail_share,
    weight_warnings,
)
from seqppl.distributions import EBM, ExactRoute
from seqppl.distributions.ancestral import draw_step
from seqppl.estimate import (
    DefensiveMixture,
    PartitionEstimate,
    check_proposal_covers,
    eubo,
    mean_and_stderr,
    normal_interval,
)
from seqppl.logspace import logsumexp, softmax
from seqppl.sharding import shard_batch, to_host
from seqppl.tables import per_decision

__all__ = ["sequential_monte_carlo", "resample", "RESAMPLING"]

RESAMPLING = ("multinomial", "stratified", "systematic")


def sequential_monte_carlo(
    ebm,
    proposal,
    num_samples: int,
    key,
    *,
    level: float = 0.95,
    twist=None,
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    num_replicates: int = 16,
    max_kept: int = 100_000,
    target_samples="auto",
    target_key=None,
    min_ess_fraction: float = 0.01,
    mesh=None,
) -> PartitionEstimate:
    """The SMC ``PartitionEstimate`` (see ``sp.log_partition``): ``num_replicates`` independent
    runs of ``num_samples // num_replicates`` particles, pooled as ``log mean_r Ẑ_r``; with a
    ``mesh`` the replicates are split over its devices (no communication between them)."""
    check_mesh(mesh)
    resampling = check_choice("resampling", resampling, RESAMPLING)
    ess_threshold = check_number("ess_threshold", ess_threshold, 0, 1, "[]")
    check_counts(("num_replicates", num_replicates, 2))
    particles = num_samples // num_replicates
    if particles < 2:
        raise ValueError(
            f"num_samples={num_samples} gives {particles} particles per replicate "
            f"(num_replicates={num_replicates}); need at least 2"
        )
    spec, lattice_twist = _check_twist(ebm, twist)
    check_proposal_covers(ebm, DefensiveMixture(proposal))
    keys = jax.random.split(jax.random.fold_in(key, 1), num_replicates)
    out = _run(ebm, proposal, keys, ess_threshold, spec, particles, resampling, mesh, lattice_twist)
    out = {name: to_host(value) for name, value in out.items()}
    log_w = np.asarray(out["log_w"], np.float64)  # [R, P], each row carries log Ẑ_r's prefix
    if np.isnan(log_w).any():
        raise ValueError(f"an SMC weight is NaN: {_nan_source(ebm, proposal, twist, out)}")
    log_z_r = logsumexp(jnp.asarray(log_w), 1) - np.log(particles)
    log_z_r = np.asarray(log_z_r, np.float64)
    log_z, stderr = _pooled(log_z_r)
    ess = float(sum(kish_ess(row) for row in log_w))
    total = particles * num_replicates
    tokens = np.asarray(out["tokens"]).reshape(total, -1)
    replicate = np.repeat(np.arange(num_replicates), particles)
    khat, khat_note = sequence_khat(log_w.reshape(-1), tokens, replicate)
    share = tail_share(log_w.reshape(-1), tokens, replicate)
    messages = weight_warnings(
        khat, ess, total, min_ess_fraction, "SMC pooled final weights", share
    )
    khat_note = khat_note or tail_note(khat, share, total)
    lower, lower_stderr = mean_and_stderr(log_z_r)
    upper, upper_stderr = eubo(
        ebm, DefensiveMixture(proposal), target_samples, num_samples, target_key
    )
    return PartitionEstimate(
        log_z=log_z,
        stderr=stderr,
        interval=normal_interval(log_z, stderr, level, dof=num_replicates - 1),
        ess=ess,
        khat=khat,
        elbo=lower,
        eubo=upper,
        num_samples=total,
        method="smc",
        level=level,
        elbo_stderr=lower_stderr,
        eubo_stderr=upper_stderr,
        log_weights=log_w.reshape(-1)[:max_kept],
        samples=tokens[:max_kept],
        messages=tuple(messages),
        khat_note=khat_note,
        extras={
            "replicate_log_z": log_z_r,
            "tail_share": share,
            "resampling_steps": np.asarray(out["resampled"]).sum(-1),
            "ess_trace": np.asarray(out["ess"]).mean(0),
            "particles": particles,
            "num_replicates": num_replicates,
            "resampling": resampling,
        },
    )


def _nan_source(ebm, proposal, twist, out) -> str:
    """What made a weight NaN, found by scoring the final particles again, eagerly: the EBM's
    reward, the proposal's ``log q`` or a callable twist, each message naming the sequence."""
    tokens = jnp.asarray(out["tokens"]).reshape(-1, ebm.space.horizon)
    parts = [
        ("the EBM's reward", lambda: ebm.unnormalized_log_prob(tokens)),
        ("the proposal's log q", lambda: proposal.log_prob(tokens)),
    ]
    if isinstance(twist, EBM):
        parts.append(("the twist EBM's reward", lambda: twist.unnormalized_log_prob(tokens)))
    elif callable(twist):
        parts.append(("twist_fn(tokens)", lambda: twist(tokens)))
    for what, score in parts:
        try:
            refuse_invalid(score(), what, rows=tokens)
        except ValueError as error:
            return f"{what} is the source: {error}"
    suspects = "the EBM's reward, the proposal's logits" + (" or the twist" if twist else "")
    return f"{suspects} gave NaN or +∞ on a particle that resampling dropped"


def _pooled(log_z_r):
    """``log mean_r Ẑ_r`` and its delta-method standard error over the replicates."""
    r = log_z_r.size
    top = np.max(log_z_r)
    if top == -np.inf:
        return -np.inf, np.inf
    relative = np.exp(log_z_r - top)
    mean = relative.mean()
    stderr = np.sqrt(np.var(relative / mean, ddof=1) / r)
    return float(top + np.log(mean)), float(stderr)


class _Twist:
    """``init(P) -> state``; ``update(state, tokens, token, done, log_pi, t) -> (state, Φ_t)``."""

    def __init__(self, init, update):
        self.init, self.update = init, update


def _check_twist(ebm, twist):
    """``(spec, lattice EBM or None)``: ``spec`` is None, ``"lattice"`` (the twist is the exact
    twist of the lattice EBM: the target for ``"exact"``, or a given approximation) or a
    callable ``twist_fn``."""
    if isinstance(twist, EBM):
        check_model(twist, EBM, ebm, "twist")
        if twist.exact_route is not ExactRoute.DYNAMIC_PROGRAM or twist.batch_shape:
            raise ValueError(
                "a twist EBM must have all its parts on lattices (a dynamic program) and batch "
                "shape (), e.g. an n-gram fit to the proposal, constrained: base.constrain(dfa)"
            )
        return "lattice", twist
    if isinstance(twist, str):
        if twist != "exact":
            raise ValueError(f"twist must be None, 'exact', an EBM or a callable, got {twist!r}")
        if ebm.exact_route is not ExactRoute.DYNAMIC_PROGRAM:
            raise ValueError(
                "twist='exact' needs an EBM whose parts are all lattice tables; pass a lattice "
                "EBM that approximates it (twist=approx_ebm) or a twist_fn(tokens) -> [P, T]"
            )
        return "lattice", ebm
    if twist is not None and not callable(twist):
        raise TypeError(
            f"twist must be None, 'exact', an EBM or a callable, got {type(twist).__name__}"
        )
    return twist, None


def _twist(ebm, twist) -> _Twist:
    """The twist of a ``_check_twist`` spec, built inside the trace (for ``"lattice"``, ``ebm``
    is the lattice EBM)."""
    if twist is None:  # Φ_t = log q(y_{≤t}): the running proposal log-probability
        return _Twist(
            lambda p: jnp.zeros((p,)),
            lambda acc, tokens, token, done, log_pi, t: (acc + log_pi,) * 2,
        )
    if twist == "lattice":  # ebm: the lattice EBM whose exact twist this is
        joint, table = ebm.joint, per_decision(ebm.reward_table(), ebm.space.horizon)
        values, delta = soft_values(joint, table, trusted=True), jnp.asarray(joint.delta)
        start = joint.initial_state(ebm.prompt, trusted=True)
        eos = ebm.space.eos_sentinel
        horizon = ebm.space.horizon

        def update(state, tokens, token, done, log_pi, t):
            s, acc = state
            acc = acc + jnp.where(done, 0.0, table[t, s, token])
            s = delta[s, token]
            ahead = values[jnp.minimum(t + 1, horizon - 1), s]
            ended = done | (token == eos) | (t + 1 >= horizon)
            return (s, acc), acc + jnp.where(ended, 0.0, ahead)

        return _Twist(lambda p: (jnp.full((p,), start), jnp.zeros((p,), table.dtype)), update)
    return _Twist(
        lambda p: jnp.zeros(()),
        lambda state, tokens, token, done, log_pi, t: (state, jnp.take(twist(tokens), t, -1)),
    )


def resample(key, log_w, scheme: str):
    """Ancestor indices ``[P]`` with probabilities ``softmax(log_w)``; zero-weight particles are
    never chosen (a uniform rounded up to the total is clipped to the last positive weight)."""
    p = log_w.shape[0]
    cumulative = jnp.cumsum(softmax(log_w))
    if scheme == "multinomial":
        u = jax.random.uniform(key, (p,))
    elif scheme == "stratified":
        u = (jnp.arange(p) + jax.random.uniform(key, (p,))) / p
    else:
        u = (jnp.arange(p) + jax.random.uniform(key, ())) / p
    index = jnp.searchsorted(cumulative, u * cumulative[-1], side="right")
    last_alive = p - 1 - jnp.argmax(jnp.flip(log_w) > -jnp.inf)
    return jnp.minimum(index, last_alive)


def _gather(tree, index, p):
    """Every non-scalar leaf reordered along its leading particle axis; scalars are shared.

    Raises:
        ValueError: a non-scalar state leaf whose leading axis is not the ``p`` particles.
    """

    def one(x):
        if jnp.ndim(x) == 0:
            return x
        if x.shape[0] != p:
            raise ValueError(
                f"a decoder or twist state leaf has shape {x.shape}; SMC needs every non-scalar "
                f"leaf to lead with the particle axis ({p})"
            )
        return x[index]

    return jax.tree.map(one, tree)


@functools.partial(jax.jit, static_argnames=("twist_spec", "p", "scheme", "mesh"))
def _run(ebm, proposal, keys, ess_threshold, twist_spec, p, scheme, mesh=None, lattice=None):
    """``num_replicates = len(keys)`` independent SMC runs of ``p`` particles (vmapped; the
    replicates split over ``mesh``)."""
    space = ebm.space
    twist = _twist(lattice, twist_spec)
    dtype = jnp.result_type(float)
    horizon, eos = space.horizon, space.eos_sentinel

    def one(key):
        decoder_state, next_logits, advance = proposal.decoder((p,))

        def step(carry, t, step_key, final: bool):
            dec, tw, tokens, done, log_w, phi_prev, log_z = carry
            draw_key, resample_key = jax.random.split(step_key)
            token, log_pi = draw_step(draw_key, next_logits(dec, t), t, done, space)
            tokens = tokens.at[:, t].set(token)
            dec = advance(dec, token, t)
            tw, phi = twist.update(tw, tokens, token, done, log_pi, t)
            if final:
                phi = ebm.unnormalized_log_prob(tokens)
            phi = phi.astype(dtype)
            increment = phi - phi_prev - log_pi
            dead = (log_w == -jnp.inf) | (phi_prev == -jnp.inf)  # weight 0 stays 0 (never NaN)
            log_w = jnp.where(dead, -jnp.inf, log_w + increment).astype(dtype)
            done = done | (token == eos)
            ess = jnp.exp(2 * logsumexp(log_w, 0) - logsumexp(2 * log_w, 0))
            ess = jnp.where(jnp.isnan(ess), 0.0, ess)
            if final:
                return (dec, tw, tokens, done, log_w, phi, log_z), (ess, jnp.array(False))
            redo = ess < ess_threshold * p
            index = jnp.where(redo, resample(resample_key, log_w, scheme), jnp.arange(p))
            dec, tw, tokens, done, phi = _gather((dec, tw, tokens, done, phi), index, p)
            log_z = log_z + jnp.where(redo, logsumexp(log_w, 0) - jnp.log(p), 0.0).astype(dtype)
            all_dead = jnp.all(log_w == -jnp.inf)  # Ẑ_r = 0: a valid outcome, kept as −∞
            log_w = jnp.where(redo & ~all_dead, jnp.zeros_like(log_w), log_w)
            return (dec, tw, tokens, done, log_w, phi, log_z), (ess, redo)

        tokens = jnp.zeros((p, horizon), jnp.int32)
        carry = (
            decoder_state,
            twist.init(p),
            tokens,
            jnp.zeros((p,), bool),
            jnp.zeros((p,), dtype),
            jnp.zeros((p,), dtype),
            jnp.zeros((), dtype),
        )
        step_keys = jax.random.split(key, horizon)
        carry, (ess, redo) = jax.lax.scan(
            lambda c, x: step(c, x[0], x[1], False),
            carry,
            (jnp.arange(horizon - 1), step_keys[:-1]),
        )
        carry, (last_ess, _) = step(carry, horizon - 1, step_keys[-1], True)
        _, _, tokens, _, log_w, _, log_z = carry
        return {
            "tokens": tokens,
            "log_w": log_z + log_w,
            "ess": jnp.append(ess, last_ess),
            "resampled": redo,
        }

    return shard_batch(jax.vmap(one)(shard_batch(keys, mesh)), mesh)
