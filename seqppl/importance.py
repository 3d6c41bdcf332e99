"""Importance sampling of ``log Z`` with an ARM proposal, streamed in chunks
(docs/theory.md#importance-sampling).

``Z = E_{y~q}[exp(R(y) − log q(y))]``; with ``S`` draws, ``Ẑ = (1/S) Σ_i w_i`` is unbiased and
``log Ẑ`` has the delta-method standard error ``√((S·Σw²/(Σw)² − 1)/(S − 1))``. The sums are
accumulated across chunks in log space (``logaddexp``), so memory stays bounded whatever ``S``:
only the first ``max_kept`` draws and weights are kept (for k-hat, plots and DataTrees). A
defensive mixture ``q_α = (1 − α) q + α u`` (``u`` the uniform policy: uniform over the actions
at each step, which in an EOS space favours short responses; or any ARM) bounds the weights
by ``R − log(α u)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import check_counts, check_mesh, check_model, check_number, refuse_invalid
from seqppl.diagnostics import sequence_khat, tail_note, tail_share, weight_warnings
from seqppl.distributions import ARM
from seqppl.estimate import (
    DefensiveMixture,
    PartitionEstimate,
    check_proposal_covers,
    eubo,
    normal_interval,
)
from seqppl.lattice import Lattice
from seqppl.progress import progress_bar
from seqppl.sharding import shard_batch, to_host

__all__ = ["importance_sampling", "importance_chunk", "DRAWS_PER_CHUNK"]

DRAWS_PER_CHUNK = 1 << 15
"""Default importance-sampling draws per chunk (memory is bounded by it, not by the total)."""


def importance_sampling(
    ebm,
    proposal: ARM,
    num_samples: int,
    key,
    *,
    level: float = 0.95,
    chunk_size: int = DRAWS_PER_CHUNK,
    max_kept: int = 100_000,
    defensive: float = 0.0,
    defensive_proposal: ARM | None = None,
    target_samples="auto",
    target_key=None,
    min_ess_fraction: float = 0.01,
    progress: bool | None = None,
    mesh=None,
) -> PartitionEstimate:
    """The importance-sampling ``PartitionEstimate`` (see ``sp.log_partition`` for the
    arguments); chunk ``c`` draws with ``fold_in(key, c)``, so results depend on ``chunk_size``
    but not on ``mesh`` (each chunk's draws split over its devices, ``seqppl.sharding``)."""
    check_mesh(mesh)
    defensive = check_number("defensive", defensive, 0, 1, "[)")
    check_counts(("chunk_size", chunk_size, 1))
    mixture = None
    if defensive > 0:
        mixture = defensive_proposal or _uniform_arm(ebm)
        check_model(mixture, ARM, ebm, "defensive_proposal")
    q = DefensiveMixture(proposal, mixture, defensive)
    check_proposal_covers(ebm, q)

    chunk = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    sums = _Sums()
    kept_tokens, kept_log_w = [], []
    bar = progress_bar(
        range(num_chunks),
        progress=progress if progress is not None else num_chunks > 1,
        desc="importance sampling",
    )
    for c in bar:
        valid = min(chunk, num_samples - c * chunk)
        tokens, log_w, stats = importance_chunk(
            ebm, q, jax.random.fold_in(key, c), valid, chunk, mesh
        )
        stats = jax.device_get(stats)
        if stats["first_bad"] >= 0:  # the bad reward again, eagerly, for the message
            row = jnp.asarray(to_host(tokens)[int(stats["first_bad"])][None])  # on this process
            refuse_invalid(ebm.unnormalized_log_prob(row), "the EBM's reward", rows=row)
        sums.add(stats)
        room = max_kept - sum(len(w) for w in kept_log_w)
        if room > 0:  # kept on the devices, gathered after the last chunk
            keep = min(room, valid)
            kept_tokens.append(tokens[:keep])
            kept_log_w.append(log_w[:keep])
    log_weights = np.concatenate([to_host(w) for w in kept_log_w]).astype(np.float64)
    samples = np.concatenate([to_host(t) for t in kept_tokens])
    log_z, stderr, ess = sums.log_z_stderr_ess(num_samples)
    elbo, elbo_stderr = sums.elbo()
    upper, upper_stderr = eubo(ebm, q, target_samples, num_samples, target_key)
    khat, khat_note = sequence_khat(log_weights, samples)
    share = tail_share(log_weights, samples)
    messages = weight_warnings(
        khat, ess, num_samples, min_ess_fraction, "importance sampling", share
    )
    khat_note = khat_note or tail_note(khat, share, num_samples)
    return PartitionEstimate(
        log_z=log_z,
        stderr=stderr,
        interval=normal_interval(log_z, stderr, level),
        ess=ess,
        khat=khat,
        elbo=elbo,
        eubo=upper,
        num_samples=num_samples,
        method="is",
        level=level,
        elbo_stderr=elbo_stderr,
        eubo_stderr=upper_stderr,
        log_weights=log_weights,
        samples=samples,
        messages=tuple(messages),
        khat_note=khat_note,
        extras={"chunk_size": chunk, "defensive": defensive, "tail_share": share},
    )


def _uniform_arm(ebm) -> ARM:
    """The uniform policy (uniform actions at every step): the default defensive component."""
    space = ebm.space
    zeros = jnp.zeros((1, space.num_actions), jnp.result_type(float))
    return ARM.from_table(Lattice.markov(space, 0), zeros, prompt=ebm.prompt)


@functools.partial(jax.jit, static_argnames=("chunk", "mesh"))
def importance_chunk(ebm, q: DefensiveMixture, key, valid, chunk: int, mesh=None):
    """One chunk of importance sampling, a pure jitted kernel: ``chunk`` draws from ``q``,
    ``log w = R(y) − log q(y)`` (−∞ past the first ``valid``) and the chunk's sufficient
    statistics (shifted weight mean and squared deviations, finite log-weight mean and squared
    deviations, counts, the index of a NaN/+∞ reward or −1).

    Args:
        ebm: the target ``EBM``.
        q: the ``DefensiveMixture`` draws come from.
        key: a typed PRNG key.
        valid: the draws that count (the last chunk may be partly padding).
        chunk: draws in the chunk (static).
        mesh: optional ``jax.sharding.Mesh``: the draws split over its devices.

    Returns:
        ``(tokens [chunk, T], log_w [chunk], stats)``.
    """
    draw_key, mix_key, pick_key = jax.random.split(key, 3)
    tokens, (steps,) = q.arm.sample_with_intermediates(draw_key, (chunk,))
    log_q = steps.sum(-1)
    if q.defensive is not None:  # iid draws from q_α: pick a component per draw
        other = q.defensive.sample(mix_key, (chunk,))
        pick = jax.random.uniform(pick_key, (chunk,)) < q.alpha
        tokens = jnp.where(pick[:, None], other, tokens)
        log_q = q.log_prob(tokens)
    tokens, log_q = shard_batch((tokens, log_q), mesh)
    rewards = ebm.unnormalized_log_prob(tokens)
    in_chunk = jnp.arange(chunk) < valid
    bad = in_chunk & (jnp.isnan(rewards) | (rewards == jnp.inf))
    log_w = jnp.where(in_chunk, rewards - log_q, -jnp.inf)
    finite = in_chunk & jnp.isfinite(log_w)
    count = jnp.sum(finite)
    mean = jnp.sum(jnp.where(finite, log_w, 0.0)) / jnp.maximum(count, 1)
    shift = jnp.max(log_w)  # weights exp(log_w − shift) in [0, 1]: no overflow, no cancellation
    scaled = jnp.where(finite, jnp.exp(log_w - jnp.where(jnp.isfinite(shift), shift, 0.0)), 0.0)
    scaled_mean = jnp.sum(scaled) / valid
    stats = {
        "shift": shift,
        "w_mean": scaled_mean,
        "w_m2": jnp.sum(jnp.where(in_chunk, (scaled - scaled_mean) ** 2, 0.0)),
        "valid": valid,
        "count": count,
        "zeros": jnp.sum(in_chunk & (log_w == -jnp.inf)),
        "mean": mean,
        "m2": jnp.sum(jnp.where(finite, (log_w - mean) ** 2, 0.0)),
        "first_bad": jnp.where(jnp.any(bad), jnp.argmax(bad), -1),
    }
    return tokens, log_w, stats


class _Sums:
    """Running sums across chunks in float64 (Chan's pooled mean and squared deviations):
    of the weights ``exp(log w − shift)`` with a running maximum ``shift``, for ``Ẑ``, its
    variance and the ESS; and of the finite ``log w``, for the ELBO."""

    def __init__(self):
        self.shift = -np.inf
        self.n = self.count = self.zeros = 0
        self.w_mean = self.w_m2 = self.mean = self.m2 = 0.0

    def add(self, s):
        shift = max(self.shift, float(s["shift"]))
        old = 0.0 if self.shift == -np.inf else np.exp(self.shift - shift)
        new = 0.0 if float(s["shift"]) == -np.inf else np.exp(float(s["shift"]) - shift)
        self.shift = shift
        self.n, self.w_mean, self.w_m2 = _chan(
            self.n, self.w_mean * old, self.w_m2 * old**2,
            int(s["valid"]), float(s["w_mean"]) * new, float(s["w_m2"]) * new**2,
        )  # fmt: skip
        self.count, self.mean, self.m2 = _chan(
            self.count, self.mean, self.m2, int(s["count"]), float(s["mean"]), float(s["m2"])
        )
        self.zeros += int(s["zeros"])

    def log_z_stderr_ess(self, n: int):
        if self.shift == -np.inf:
            return -np.inf, np.inf, 0.0
        relative_var = self.w_m2 / (n - 1) / self.w_mean**2  # Var(w) / mean(w)²
        ess = n / (1.0 + relative_var * (n - 1) / n)  # (Σ w)² / Σ w²
        return float(self.shift + np.log(self.w_mean)), float(np.sqrt(relative_var / n)), ess

    def elbo(self):
        if self.zeros:  # a draw outside the EBM's support: E_q[R − log q] = −∞
            return -np.inf, float("nan")
        return float(self.mean), float(np.sqrt(self.m2 / (self.count - 1) / self.count))


def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Pooled count, mean and sum of squared deviations of two groups (Chan et al., 1979)."""
    total = n_a + n_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    delta = mean_b - mean_a
    return total, mean_a + delta * n_b / total, m2_a + m2_b + delta**2 * n_a * n_b / total
