"""Sequential Monte Carlo over positions for ``log Z`` with an ARM proposal and optional twists.

Intermediate targets on prefixes: ``γ_t(y_{≤t}) = exp Φ_t(y_{≤t})`` for ``t < T − 1`` and
``γ_{T−1}(y) = exp R(y)``, where the twist ``Φ_t`` estimates ``log Σ_{y' ⊒ y_{≤t}} exp R(y')``;
the twist kinds (``seqppl.twists``): None (``Φ_t = log q(y_{≤t})``, no lookahead), ``"exact"``
(a lattice EBM's accumulated local rewards plus the soft value of the state reached: exact prefix
marginals, docs/theory.md#sequential-monte-carlo), a lattice EBM approximating the target (its
exact twist), a ``TableTwist`` (``sp.fit_twist``) or a callable ``twist_fn``.

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

from seqppl.checks import (
    check_choice,
    check_counts,
    check_mesh,
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
from seqppl.distributions import EBM
from seqppl.distributions.ancestral import draw_step, step_log_prob
from seqppl.estimate import (
    DefensiveMixture,
    PartitionEstimate,
    check_proposal_covers,
    eubo,
    mean_and_stderr,
    normal_interval,
    target_draws,
)
from seqppl.logspace import logsumexp, softmax
from seqppl.sharding import shard_batch, to_host
from seqppl.table_twist import TableTwist
from seqppl.twists import build_twist, check_twist

__all__ = ["sequential_monte_carlo", "resample", "RESAMPLING", "UPPER_BOUNDS"]

RESAMPLING = ("multinomial", "stratified", "systematic")
UPPER_BOUNDS = ("eubo", "csmc")
"""SMC's upper bounds on ``log Z``, both from exact target draws: the proposal's EUBO
``E_p[R − log q]``, or conditional SMC's ``E[log Ẑ_CSMC]`` (tighter, one more SMC run)."""


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
    upper_bound: str = "eubo",
    mesh=None,
) -> PartitionEstimate:
    """The SMC ``PartitionEstimate`` (see ``sp.log_partition``): ``num_replicates`` independent
    runs of ``num_samples // num_replicates`` particles, pooled as ``log mean_r Ẑ_r``; with a
    ``mesh`` the replicates are split over its devices (no communication between them).

    ``upper_bound="csmc"``: ``eubo`` is conditional SMC's bound instead of the proposal's.
    Replicate r runs again with particle 0 held to an exact target draw ``y*_r`` (its tokens
    forced, its ancestor itself at every resampling, the others resampled multinomially);
    since ``E[1/Ẑ_CSMC] = P(Ẑ_SMC > 0) / Z ≤ 1/Z`` (equality when no run can lose every
    particle), Jensen gives ``E[log Ẑ_CSMC] ≥ log Z`` (``extras["csmc_log_z"]``: the R replicate
    values). With the SMC bound ``elbo = mean_r log Ẑ_r ≤ log Z`` in expectation,
    ``[elbo, eubo]`` sandwiches ``log Z``; both are None/absent without exact target draws."""
    check_mesh(mesh)
    resampling = check_choice("resampling", resampling, RESAMPLING)
    upper_bound = check_choice("upper_bound", upper_bound, UPPER_BOUNDS)
    ess_threshold = check_number("ess_threshold", ess_threshold, 0, 1, "[]")
    check_counts(("num_replicates", num_replicates, 2))
    particles = num_samples // num_replicates
    if particles < 2:
        raise ValueError(
            f"num_samples={num_samples} gives {particles} particles per replicate "
            f"(num_replicates={num_replicates}); need at least 2"
        )
    spec, payload = check_twist(ebm, twist, proposal)
    check_proposal_covers(ebm, DefensiveMixture(proposal))
    keys = jax.random.split(jax.random.fold_in(key, 1), num_replicates)
    out = _run(ebm, proposal, keys, ess_threshold, spec, particles, resampling, mesh, payload)
    out = {name: to_host(value) for name, value in out.items()}
    log_w = np.asarray(out["log_w"], np.float64)  # [R, P], each row carries log Ẑ_r's prefix
    if np.isnan(log_w).any():
        raise ValueError(f"an SMC weight is NaN: {_nan_source(ebm, proposal, twist, out)}")
    log_z_r = _replicate_log_z(log_w)
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
    extras = {}
    if upper_bound == "csmc":
        references = target_draws(ebm, target_samples, num_replicates, target_key)
        upper, upper_stderr = None, None
        if references is not None:
            references = references[np.arange(num_replicates) % len(references)]
            csmc = _run(ebm, proposal, keys, ess_threshold, spec, particles, "multinomial",
                        mesh, payload, references)  # fmt: skip
            csmc_log_z = _replicate_log_z(np.asarray(to_host(csmc["log_w"]), np.float64))
            upper, upper_stderr = mean_and_stderr(csmc_log_z)
            extras["csmc_log_z"] = csmc_log_z
    else:
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
            **extras,
            "upper_bound": upper_bound,
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
    elif isinstance(twist, TableTwist):
        parts.append(("the learned twist", lambda: twist.log_phi(tokens)))
    elif callable(twist):
        parts.append(("twist_fn(tokens)", lambda: twist(tokens)))
    for what, score in parts:
        try:
            refuse_invalid(score(), what, rows=tokens)
        except ValueError as error:
            return f"{what} is the source: {error}"
    suspects = "the EBM's reward, the proposal's logits" + (" or the twist" if twist else "")
    return f"{suspects} gave NaN or +∞ on a particle that resampling dropped"


def _replicate_log_z(log_w) -> np.ndarray:
    """``log Ẑ_r = log mean_i w_{r,i}`` float64 ``[R]`` of final log weights ``[R, P]`` (each
    row already carrying its run's resampling normalisers)."""
    return np.asarray(logsumexp(jnp.asarray(log_w), 1), np.float64) - np.log(log_w.shape[1])


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
def _run(
    ebm, proposal, keys, ess_threshold, twist_spec, p, scheme, mesh=None, payload=None, refs=None
):
    """``num_replicates = len(keys)`` independent SMC runs of ``p`` particles (vmapped; the
    replicates split over ``mesh``); with reference paths ``refs [R, T]``, conditional SMC
    (particle 0 of replicate r follows ``refs[r]``)."""
    space = ebm.space
    dtype = jnp.result_type(float)
    horizon, eos = space.horizon, space.eos_sentinel
    first = jnp.arange(p) == 0

    def one(key, ref):
        decoder_state, next_logits, advance = proposal.decoder((p,))
        twist = build_twist(twist_spec, payload, p)

        def step(carry, t, step_key, final: bool):
            dec, tw, tokens, done, log_w, phi_prev, log_z = carry
            draw_key, resample_key = jax.random.split(step_key)
            logits = next_logits(dec, t)
            token, log_pi = draw_step(draw_key, logits, t, done, space)
            if ref is not None:  # the reference particle's token and its log π
                token = jnp.where(first, ref[t], token)
                log_pi = jnp.where(first, step_log_prob(logits, token, t, done, space), log_pi)
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
            index = resample(resample_key, log_w, scheme)
            if ref is not None:  # the reference particle is its own ancestor
                index = jnp.where(first, 0, index)
            index = jnp.where(redo, index, jnp.arange(p))
            dec, tw, tokens, done, phi = _gather((dec, tw, tokens, done, phi), index, p)
            log_z = log_z + jnp.where(redo, logsumexp(log_w, 0) - jnp.log(p), 0.0).astype(dtype)
            all_dead = jnp.all(log_w == -jnp.inf)  # Ẑ_r = 0: a valid outcome, kept as −∞
            log_w = jnp.where(redo & ~all_dead, jnp.zeros_like(log_w), log_w)
            return (dec, tw, tokens, done, log_w, phi, log_z), (ess, redo)

        tokens = jnp.zeros((p, horizon), jnp.int32)
        carry = (
            decoder_state,
            twist.state,
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

    refs = None if refs is None else shard_batch(refs, mesh)
    return shard_batch(jax.vmap(one)(shard_batch(keys, mesh), refs), mesh)
