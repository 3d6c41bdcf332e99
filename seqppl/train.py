"""Likelihood training of ARMs and EBMs with optax (docs/theory.md#learning).

``fit(dist, data=..., ...)`` minimises the mean negative log-likelihood of observed sequences:
teacher forcing for an ARM (``−log p_q(y) = Σ_t [V_q(s_t) − q(s_t, y_t)]``, one parallel pass),
``A(x) − R(x, y)`` for an EBM (exact ``A`` along its exact route). ``fit(dist, target=rho,
...)`` minimises the exact expected risk ``E_{y~ρ}[−log p(y)]`` over every sequence of an
enumerable space instead (chunked: bounded memory), whose minimum is the entropy ``H(ρ)``.

The loop, checkpoints and resumption are ``seqppl.loop``'s: the minibatch of step k is drawn with
``fold_in(key, k)``; ``fit`` started again with the same ``checkpoint_dir`` and the same data,
target, initial parameters, optimiser and key continues from the newest checkpoint (bit-identical
on CPU), and any change is refused, naming it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from seqppl.checks import check_choice, check_counts, check_key, check_model, check_number
from seqppl.distributions import ARM, EBM, ExactRoute, NoExactRoute
from seqppl.distributions.support import map_in_chunks
from seqppl.logspace import logsumexp
from seqppl.loop import (
    CHECKPOINT_NAME,
    CheckpointError,
    optimise,
    run_fingerprint,
    trapezoid_schedule,
)
from seqppl.sharding import shard_batch
from seqppl.space import ENUMERATION_CHUNK, MAX_ENUMERATE

__all__ = [
    "fit",
    "exact_risk",
    "prefix_weights",
    "data_loss",
    "model_signature",
    "trapezoid_schedule",
    "CHECKPOINT_NAME",
    "CheckpointError",
]


def exact_risk(dist, log_target, mesh=None) -> jax.Array:
    """``E_{y~ρ}[−log p(y)]`` over every sequence, ``ρ = exp(log_target)`` ``[N]`` in the order of
    ``space.enumerate()``.

    A callable ARM over a fixed-length space is scored once per distinct prefix: by the chain
    rule the risk is ``−Σ_t Σ_{s_t} Σ_a ρ(s_t, a) log π(a | s_t)`` (``ρ(s_t, a)`` the mass of the
    sequences that start with ``s_t, a``), and every prefix is read from the ``N / A`` parents
    ``y_{<T}`` (``prefix_weights``), an ``A``-fold saving over scoring every sequence. Sequences
    are scored ``ENUMERATION_CHUNK`` at a time; with a ``mesh`` each chunk's rows are split over
    its devices (``seqppl.sharding``).
    """
    space = dist.space
    if space.num_sequences > MAX_ENUMERATE:
        raise ValueError(f"exact_risk enumerates the space; it has {space.num_sequences} sequences")
    seqs = jnp.asarray(space.enumerate())
    log_target = jnp.asarray(log_target)
    if log_target.shape != (seqs.shape[0],):
        raise ValueError(f"target must have shape [{seqs.shape[0]}], got {log_target.shape}")
    weights = jnp.exp(log_target)
    if isinstance(dist, ARM) and dist.lattice is None and not space.eos:
        parents = seqs[:: space.num_actions]  # y_{<T} followed by action 0
        log_policies = map_in_chunks(dist.log_policies, parents, ENUMERATION_CHUNK, mesh)
        prefix_mass = prefix_weights(weights, space)
        return -jnp.sum(jnp.where(prefix_mass > 0, log_policies, 0.0) * prefix_mass)
    if isinstance(dist, EBM) and dist.exact_route is not ExactRoute.DYNAMIC_PROGRAM:
        # one pass: the rewards of every sequence give both Σ ρ R and log Z = logsumexp R
        rewards = map_in_chunks(dist.unnormalized_log_prob, seqs, ENUMERATION_CHUNK, mesh)
        return logsumexp(rewards, 0) - jnp.sum(jnp.where(weights > 0, weights * rewards, 0.0))
    score = dist.unnormalized_log_prob if isinstance(dist, EBM) else dist.log_prob
    scores = map_in_chunks(score, seqs, ENUMERATION_CHUNK, mesh)
    risk = -jnp.sum(jnp.where(weights > 0, weights * scores, 0.0))
    return risk + dist.log_partition() if isinstance(dist, EBM) else risk


def prefix_weights(target, space) -> jax.Array:
    """``W [N/A, T, A]``: ``W[p, t, a] = ρ(y_{<t}, a)``, the mass of the sequences starting with
    parent p's first t tokens and then a, when p is the first parent in enumeration order with
    that prefix (its later tokens all 0), else 0; ``target`` is ``ρ`` ``[N]`` over a fixed-length
    space's ``enumerate()``, so ``Σ_{p,t,a} W[p, t, a] · f(y_{<t}^p, a)`` visits each prefix once.
    """
    A, T = space.num_actions, space.horizon
    rho = target.reshape((A,) * T)
    weights = jnp.zeros((A ** (T - 1), T, A), target.dtype)
    for t in range(T):
        mass = rho.sum(axis=tuple(range(t + 1, T))).reshape(A**t, A)  # ρ(y_{<t}, a)
        first_parent = jnp.arange(A**t) * A ** (T - 1 - t)
        weights = weights.at[first_parent, t].set(mass)
    return weights


def fit(
    dist,
    data=None,
    *,
    target=None,
    steps: int,
    key,
    optimizer=None,
    learning_rate: float = 1e-2,
    batch_size: int = 64,
    log_every: int = 10,
    checkpoint_dir=None,
    checkpoint_every: int = 500,
    metrics=None,
    log_partition: str = "exact",
    proposal=None,
    num_samples: int = 256,
    progress: bool = True,
    mesh=None,
):
    """Train ``dist.params`` by likelihood; returns ``(trained distribution, history)``.

    Args:
        dist: an ``ARM`` or ``EBM`` with ``params`` (a table, a callable's ``params=``, or an
            NNX module's state from ``from_nnx``).
        data: observed sequences int ``[N, T]``: minibatches of ``batch_size`` drawn with
            replacement, step k from ``fold_in(key, k)``. EBMs need an exact ``log_partition``.
        target: instead of data, ``log ρ`` ``[N]`` over ``space.enumerate()``: the exact risk.
        steps: optimiser steps.
        key: a PRNG key, ``jax.random.key(n)`` or ``jax.random.PRNGKey(n)`` (minibatches).
        optimizer: an optax ``GradientTransformation``; default Adam on
            ``trapezoid_schedule(learning_rate, steps)`` (the paper's schedule).
        log_every: steps between history entries (the last step is always logged).
        checkpoint_dir: where ``checkpoint.pkl`` is written every ``checkpoint_every`` steps and
            at the end; if it holds a checkpoint of this run (same model, data or target,
            initial parameters, optimiser, steps and key), training resumes from it.
        log_partition: for an EBM on data, ``"exact"`` (DP or enumeration; an error when
            neither applies) or ``"is"``: the approximate objective
            ``−mean R(y) + log (1/S) Σ_i exp(R(ỹ_i) − log q(ỹ_i))`` with ``S = num_samples``
            fresh draws ``ỹ ~ proposal`` per step (an ARM). It is biased (the log of an
            unbiased estimate, too low by about ``Var/(2 Z²)``); its gradient is the
            self-normalised importance-sampling estimate of ``E_p[∇R] − mean ∇R(y)``.
        proposal, num_samples: the importance-sampling proposal ARM and sample size.
        metrics: optional ``metrics(dist) -> {name: float}``, evaluated on the distribution
            with the current parameters at every logged step (before that step's update).
        progress: show a tqdm bar with the loss.
        mesh: a ``jax.sharding.Mesh`` for data parallelism: each step's minibatch (or each
            exact-risk chunk, or the IS draws) split over its devices, parameters replicated,
            gradients reduced by XLA (``seqppl.sharding``); the same losses and parameters as
            on one device up to the order of floating-point sums.

    Returns:
        ``(dist.with_params(trained), history)`` with ``history`` a dict of numpy arrays
        ``step``, ``loss`` (the objective before that step's update), ``seconds`` (wall time
        since this call started, after the step; the first includes compilation) and one per
        metric.

    Raises:
        ValueError: bad arguments; ``CheckpointError`` (a ValueError) for a checkpoint that is
            corrupted, truncated or from another run (the message names what differs).
        TypeError: ``dist`` is not an ARM or EBM, or ``key`` is not a PRNG key.
    """
    if not isinstance(dist, (ARM, EBM)):
        raise TypeError(f"dist must be an ARM or an EBM, got {type(dist).__name__}")
    if (data is None) == (target is None):
        raise ValueError("give exactly one of data= (observed sequences) or target= (log ρ)")
    check_counts(
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("log_every", log_every, 1),
        ("checkpoint_every", checkpoint_every, 1),
    )
    key = check_key(key)
    check_number("learning_rate", learning_rate, 0, float("inf"))
    if dist.params is None:
        raise ValueError("dist has no params to train (give params= or use from_table/from_nnx)")
    if target is None:
        log_z = _log_partition_fn(dist, log_partition, proposal, num_samples, key, mesh)
        loss_fn = data_loss(dist, data, batch_size, key, log_z, mesh)
    else:
        loss_fn = _risk_loss(dist, target, mesh)
    optimizer = optimizer or optax.adam(trapezoid_schedule(learning_rate, steps))
    fingerprint = None
    if checkpoint_dir is not None:
        is_ebm_on_data = isinstance(dist, EBM) and target is None
        fingerprint = run_fingerprint(
            model_signature(dist),
            dist.params,
            optimizer,
            steps=str(steps),
            key=key,
            data=None if data is None else jnp.asarray(data),
            batch_size=None if data is None else str(batch_size),
            target=None if target is None else jnp.asarray(target),
            log_partition=str(log_partition) if is_ebm_on_data else None,
            proposal=proposal if is_ebm_on_data and log_partition != "exact" else None,
            num_samples=str(num_samples) if is_ebm_on_data and log_partition != "exact" else None,
        )
    params, history, stopped = optimise(
        lambda params, step, carry: (loss_fn(params, step), {}),
        dist.params,
        steps=steps,
        optimizer=optimizer,
        fingerprint=fingerprint,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        metrics=None if metrics is None else lambda params: metrics(dist.with_params(params)),
        progress=progress,
        desc="fit",
        mesh=mesh,
    )
    if stopped is not None:
        raise FloatingPointError(stopped)
    return dist.with_params(params), history


def model_signature(dist) -> str:
    """What kind of model ``dist`` is, as text for a checkpoint fingerprint: its class, space
    and parts (an EBM) or logits source (an ARM); values are digested separately."""
    inner = dist.parts if isinstance(dist, EBM) else (dist.source,)
    return f"{type(dist).__name__} over {dist.space}: " + ", ".join(
        type(part).__name__ for part in inner
    )


def _log_partition_fn(dist, method, proposal, num_samples, key, mesh=None):
    """``(model, step) -> log Z`` for the data objective of an EBM (None for an ARM)."""
    if isinstance(dist, ARM):
        return None
    method = check_choice("log_partition", method, ("exact", "is"), {"mc": "is"})
    if method == "exact":
        if not dist.exact_route.is_exact:
            raise NoExactRoute(
                "this EBM has no exact log Z (not a lattice, space too large to enumerate): "
                "train it with log_partition='is' and proposal=an ARM"
            )
        return lambda model, step: model.log_partition()
    if proposal is None:
        raise ValueError("log_partition='is' needs proposal=an ARM over the same space")
    check_model(proposal, ARM, dist, "proposal")
    check_counts(("num_samples", num_samples, 1))

    def log_z(model, step):
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), 1)
        ys, (steps,) = shard_batch(
            proposal.sample_with_intermediates(draw_key, (num_samples,)), mesh
        )
        log_w = model.unnormalized_log_prob(ys) - jax.lax.stop_gradient(steps.sum(-1))
        return logsumexp(log_w, 0) - jnp.log(num_samples)

    return log_z


def data_loss(dist, data, batch_size: int, key, log_z=None, mesh=None):
    """``loss(params, step)``: the mean negative log-likelihood of step ``step``'s minibatch of
    ``batch_size`` rows of ``data`` (drawn with ``fold_in(key, step)``), ``−mean log p(y)`` for an
    ARM and ``log_z(model, step) − mean R(y)`` for an EBM; the minibatch split over ``mesh``."""
    data = jnp.asarray(data)
    if data.ndim != 2 or data.shape[-1] != dist.space.horizon:
        raise ValueError(f"data must be int [N, {dist.space.horizon}], got shape {data.shape}")
    dist.space.validate(data)

    def loss(params, step):
        index = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, data.shape[0])
        model = dist.with_params(params)
        batch = shard_batch(data[index], mesh)
        if log_z is None:
            return -jnp.mean(model.log_prob(batch))
        return log_z(model, step) - jnp.mean(model.unnormalized_log_prob(batch))

    return loss


def _risk_loss(dist, target, mesh=None):
    return lambda params, step: exact_risk(dist.with_params(params), target, mesh)
