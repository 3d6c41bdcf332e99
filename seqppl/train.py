"""Likelihood training of ARMs and EBMs with optax (THEORY §3).

``fit(dist, data=..., ...)`` minimises the mean negative log-likelihood of observed sequences:
teacher forcing for an ARM (``−log p_q(y) = Σ_t [V_q(s_t) − q(s_t, y_t)]``, one parallel pass),
``A(x) − R(x, y)`` for an EBM (exact ``A`` by DP or chunked enumeration). ``fit(dist,
target=rho, ...)`` minimises the exact expected risk ``E_{y~ρ}[−log p(y)]`` over every sequence
of an enumerable space instead (chunked: bounded memory), whose minimum is the entropy ``H(ρ)``.

Runs are reproducible and resumable: the minibatch of step k is drawn with
``fold_in(key, k)``, checkpoints (parameters, optimiser state, step, history) are written every
``checkpoint_every`` steps atomically with a checksum, and ``fit`` started again with the same
``checkpoint_dir`` continues from the newest checkpoint, giving bit-identical parameters on CPU.
Ctrl-C writes a checkpoint of the last finished step before it propagates.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from seqppl.distributions import ARM, EBM
from seqppl.distributions.support import map_in_chunks
from seqppl.logspace import logsumexp
from seqppl.sharding import check_mesh, replicate, shard_batch
from seqppl.space import MAX_ENUMERATE

__all__ = [
    "fit",
    "optimise",
    "trapezoid_schedule",
    "exact_risk",
    "prefix_weights",
    "CHECKPOINT_NAME",
    "CheckpointError",
]

CHECKPOINT_NAME = "checkpoint.pkl"
RISK_CHUNK = 4096
"""Sequences scored at once by ``exact_risk``."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: corrupted, truncated or from another run."""


def check_counts(*counts: tuple[str, object, int]) -> None:
    """Each ``(name, value, least)``: ``value`` must be an int ≥ ``least`` (not a bool), else a
    ``ValueError`` naming the argument."""
    for name, value, least in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def trapezoid_schedule(peak: float, steps: int, warmup: int = 100, decay: int = 100):
    """The paper's learning rate: linear warm-up to ``peak``, constant, linear decay to 0.

    Built from optax schedules; ``warmup + decay`` is capped at ``steps``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup = min(warmup, steps // 2)
    decay = min(decay, steps - warmup)
    flat = steps - warmup - decay
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(warmup, 1)),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, 0.0, max(decay, 1)),
        ],
        [warmup, warmup + flat],
    )


def exact_risk(dist, log_target, mesh=None) -> jax.Array:
    """``E_{y~ρ}[−log p(y)]`` over every sequence, ``ρ = exp(log_target)`` ``[N]`` in the order of
    ``space.enumerate()``; scored in chunks of ``RISK_CHUNK`` rows (bounded memory).

    A callable ARM over a fixed-length space is scored once per distinct prefix: by the chain
    rule the risk is ``−Σ_t Σ_{s_t} Σ_a ρ(s_t, a) log π(a | s_t)`` (``ρ(s_t, a)`` the mass of the
    sequences that start with ``s_t, a``), and every prefix is read from the ``N / A`` parents
    ``y_{<T}`` (``prefix_weights``), an ``A``-fold saving over scoring every sequence. With a
    ``mesh`` each chunk's rows are split over its devices (``seqppl.sharding``).
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
        log_policies = _in_chunks(dist.log_policies, parents, mesh)  # [N/A, T, A]
        prefix_mass = prefix_weights(weights, space)
        return -jnp.sum(jnp.where(prefix_mass > 0, log_policies, 0.0) * prefix_mass)
    if isinstance(dist, EBM) and not dist.is_lattice:
        # one pass: the rewards of every sequence give both Σ ρ R and log Z = logsumexp R
        rewards = _in_chunks(dist.unnormalized_log_prob, seqs, mesh)
        return logsumexp(rewards, 0) - jnp.sum(jnp.where(weights > 0, weights * rewards, 0.0))
    score = dist.unnormalized_log_prob if isinstance(dist, EBM) else dist.log_prob
    scores = _in_chunks(score, seqs, mesh)
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


def _in_chunks(fn, rows, mesh=None):
    """``fn(rows)`` evaluated ``RISK_CHUNK`` rows at a time (``map_in_chunks``), each chunk's
    rows split over ``mesh``."""
    size = min(rows.shape[0], RISK_CHUNK)
    return map_in_chunks(lambda block: fn(shard_batch(block, mesh)), rows, size)


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
        key: a PRNG key (minibatches).
        optimizer: an optax ``GradientTransformation``; default Adam on
            ``trapezoid_schedule(learning_rate, steps)`` (the paper's schedule).
        log_every: steps between history entries (the last step is always logged).
        checkpoint_dir: where ``checkpoint.pkl`` is written every ``checkpoint_every`` steps and
            at the end; if it holds a checkpoint of this run, training resumes from it.
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
            corrupted, truncated or from another run.
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
    if dist.params is None:
        raise ValueError("dist has no params to train (give params= or use from_table/from_nnx)")
    if target is None:
        log_z = _log_partition_fn(dist, log_partition, proposal, num_samples, key, mesh)
        loss_fn = _data_loss(dist, data, batch_size, key, log_z, mesh)
    else:
        loss_fn = _risk_loss(dist, target, mesh)
    optimizer = optimizer or optax.adam(trapezoid_schedule(learning_rate, steps))
    params, history, stopped = optimise(
        lambda params, step, carry: (loss_fn(params, step), {}),
        dist.params,
        steps=steps,
        optimizer=optimizer,
        fingerprint=_fingerprint(dist, steps, data, target),
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


def optimise(
    loss_fn,
    params,
    *,
    steps: int,
    optimizer,
    fingerprint: str,
    checkpoint_dir=None,
    checkpoint_every: int = 500,
    log_every: int = 10,
    metrics=None,
    summarise=None,
    should_stop=None,
    carry=None,
    refresh=None,
    progress: bool = True,
    desc: str = "fit",
    mesh=None,
):
    """The training loop shared by ``fit`` and ``distill``: optax updates of ``params``.

    Args:
        loss_fn: ``loss_fn(params, step, carry) -> (loss, aux)``, jittable; ``grad`` of
            ``loss`` in ``params`` drives the update and ``aux`` (a dict of arrays) is handed
            to ``summarise`` and ``refresh``.
        fingerprint: what a checkpoint must match to be resumed (``_fingerprint``).
        metrics: ``metrics(params) -> {name: float}`` at every logged step (before its update).
        summarise: ``summarise(aux) -> {name: float}`` at every logged step (host side).
        should_stop: ``should_stop(history) -> str | None``, asked after every logged step; a
            message stops training there (the step's update is not applied).
        carry: a pytree of non-trained state that the loss reads (e.g. a frozen proposal's
            parameters), checkpointed with the rest.
        refresh: ``refresh(carry, params, aux) -> (carry, {name: float})`` at every logged step
            (host side): a new carry for the following steps and figures for the history.
        mesh: params, optimiser state and carry are replicated over its devices (the loss
            shards its own batch).

    Returns:
        ``(params, history, stopped)``: the last good parameters, the history (numpy arrays,
        ``step``, ``loss``, ``seconds`` and one per metric/summary), and None or the message
        that stopped the run early. After a non-finite loss at step k the parameters that
        gave it are dropped: the run goes back to step k − 1 (the last parameters with a finite
        loss), and so do the history and the checkpoint written on stopping.
    """

    @jax.jit
    def update(params, opt_state, step, carry):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, step, carry)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    state = {
        "step": 0,
        "params": params,
        "opt_state": optimizer.init(params),
        "carry": carry,
        "history": {"step": [], "loss": []},
    }
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if path is not None and path.exists():
        state = _load(path, fingerprint)
    check_mesh(mesh)
    for name in ("params", "opt_state", "carry"):
        state[name] = replicate(state[name], mesh)
    bar = tqdm(total=steps, initial=state["step"], disable=not progress, desc=desc)
    started = time.perf_counter()
    stopped = None
    last_good = None  # the state before the last update whose loss was finite
    try:
        while state["step"] < steps:
            step = state["step"]
            params, opt_state, loss, aux = update(
                state["params"], state["opt_state"], step, state["carry"]
            )
            loss = float(loss)
            if not np.isfinite(loss):
                stopped = f"the loss is {loss} at step {step}"
                if last_good is not None:  # these params gave it: go back one step
                    state = _rewound(state, last_good)
                    stopped += f"; parameters and checkpoint are those of step {state['step']}"
                break
            last_good = {k: state[k] for k in ("step", "params", "opt_state", "carry")}
            carry = state["carry"]
            if step % log_every == 0 or step == steps - 1:
                row = {"step": step, "loss": loss, "seconds": time.perf_counter() - started}
                if metrics is not None:
                    row.update(metrics(state["params"]))
                if summarise is not None:
                    row.update(summarise(aux))
                if refresh is not None:
                    carry, figures = refresh(carry, state["params"], aux)
                    row.update(figures)
                for name, value in row.items():
                    state["history"].setdefault(name, []).append(float(value))
                stopped = None if should_stop is None else should_stop(state["history"])
                if stopped is not None:  # step k is not applied: its row is redone on resume
                    for values in state["history"].values():
                        values.pop()
                    break
            state.update(step=step + 1, params=params, opt_state=opt_state, carry=carry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if path is not None and state["step"] % checkpoint_every == 0:
                _save(path, state, fingerprint)
    except KeyboardInterrupt:
        if path is not None:
            _save(path, state, fingerprint)
        raise
    finally:
        bar.close()
    if path is not None:
        _save(path, state, fingerprint)
    history = {k: np.asarray(v) for k, v in state["history"].items()}
    history["step"] = history["step"].astype(int)
    return state["params"], history, stopped


def _rewound(state, last_good):
    """``last_good`` with the history rows of its step and later dropped (they will be redone)."""
    keep = sum(1 for logged in state["history"]["step"] if logged < last_good["step"])
    history = {name: values[:keep] for name, values in state["history"].items()}
    return {**last_good, "history": history}


def _log_partition_fn(dist, method, proposal, num_samples, key, mesh=None):
    """``(model, step) -> log Z`` for the data objective of an EBM (None for an ARM)."""
    if isinstance(dist, ARM):
        return None
    if method == "exact":
        if not (dist.is_lattice or dist.space.num_sequences <= MAX_ENUMERATE):
            raise ValueError(
                "this EBM has no exact log Z (not a lattice, space too large to enumerate): "
                "train it with log_partition='is' and proposal=an ARM"
            )
        return lambda model, step: model.log_partition()
    if method != "is":
        raise ValueError(f"log_partition must be 'exact' or 'is', got {method!r}")
    if not isinstance(proposal, ARM) or proposal.space != dist.space:
        raise ValueError("log_partition='is' needs proposal=an ARM over the same space")
    check_counts(("num_samples", num_samples, 1))

    def log_z(model, step):
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), 1)
        ys, (steps,) = shard_batch(
            proposal.sample_with_intermediates(draw_key, (num_samples,)), mesh
        )
        log_w = model.unnormalized_log_prob(ys) - jax.lax.stop_gradient(steps.sum(-1))
        return logsumexp(log_w, 0) - jnp.log(num_samples)

    return log_z


def _data_loss(dist, data, batch_size, key, log_z, mesh=None):
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


def _fingerprint(dist, steps, data, target, *extra: str) -> str:
    """What must match for a checkpoint to belong to this run (``extra``: e.g. an objective)."""
    leaves = jax.tree.leaves(dist.params)
    parts = [
        type(dist).__name__,
        str(dist.space),
        str(steps),
        str(jax.tree.structure(dist.params)),
        str([(x.shape, str(x.dtype)) for x in leaves]),
        str(None if data is None else np.shape(data)),
        str(None if target is None else np.shape(target)),
        *extra,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _save(path: Path, state, fingerprint: str) -> None:
    """Atomic: write a temporary file, keep the old checkpoint as ``*.prev``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(
        {
            **jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state", "carry")}),
            "step": state["step"],
            "history": state["history"],
            "fingerprint": fingerprint,
        }
    )
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_suffix(".prev"))
    os.replace(tmp, path)


def _load(path: Path, fingerprint: str):
    blob = path.read_bytes()
    digest, _, payload = blob.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated (checksum mismatch); the previous one "
            f"is {path.with_suffix('.prev')}: move it to {path.name} to resume from it"
        )
    state = pickle.loads(payload)
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run (model, space, steps or data differ); "
            "use another checkpoint_dir"
        )
    state["params"] = jax.tree.map(jnp.asarray, state["params"])
    state["opt_state"] = jax.tree.map(jnp.asarray, state["opt_state"])
    state["carry"] = jax.tree.map(jnp.asarray, state.get("carry"))
    return state
