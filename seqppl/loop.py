"""The optimisation loop shared by ``fit`` and ``distill``: optax steps, history, checkpoints.

``optimise(loss_fn, params, ...)`` runs ``steps`` jitted optax updates with a progress bar,
logs a history row every ``log_every`` steps, stops on a non-finite loss (rewinding one step)
or on a caller's rule, and checkpoints atomically every ``checkpoint_every`` steps and on
Ctrl-C. A checkpoint records a *fingerprint* of its run: a digest per component (the model,
the data or target values, the initial parameters, the optimiser's settings as seen through a
probe, the key, ...); resuming with any component changed is refused, naming it.
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

from seqppl.checks import check_counts, check_mesh, check_number
from seqppl.progress import progress_bar
from seqppl.sharding import is_lead_process, replicate, spans_processes, to_host, to_local

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "trapezoid_schedule",
    "digest",
    "optimizer_digest",
    "run_fingerprint",
    "optimise",
    "write_atomically",
    "save_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pkl"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: corrupted, truncated or from another run."""


def trapezoid_schedule(peak: float, steps: int, warmup: int = 100, decay: int = 100):
    """The paper's learning rate: linear warm-up to ``peak``, constant, linear decay to 0.

    Built from optax schedules; ``warmup + decay`` is capped at ``steps``.

    Raises:
        ValueError: ``peak`` not a finite number > 0 (NaN included), ``steps`` not an int ≥ 1.
    """
    check_number("peak", peak, 0, float("inf"))
    check_counts(("steps", steps, 1))
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


def digest(tree) -> str:
    """SHA-256 of a pytree's values: every leaf's dtype, shape and bytes, and the nesting of its
    containers (keys, not object identities); strings and numbers by their text."""
    sha = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        sha.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, (str, int, float, bool)) or leaf is None:
            sha.update(repr(leaf).encode())
            continue
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(np.asarray(leaf))
        sha.update(f"{array.dtype}{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def optimizer_digest(optimizer, params) -> str:
    """A digest of what ``optimizer`` does: its first three updates of ``params`` under fixed
    probe gradients, to five significant digits (optax transformations are closures: their
    learning rate, schedule and decay rates are only visible through what they do)."""
    state = optimizer.init(params)
    probes = []
    for i in range(3):
        sign = (-1.0) ** i * 0.1 * (i + 1)
        grads = jax.tree.map(lambda x, s=sign: jnp.full_like(x, s), params)
        updates, state = optimizer.update(grads, state, params)
        head = [np.asarray(u).ravel()[:4] for u in jax.tree.leaves(updates)]
        probes.append(" ".join(f"{v:.5g}" for block in head for v in block))
    return hashlib.sha256("|".join(probes).encode()).hexdigest()


def run_fingerprint(model: str, params, optimizer, **components) -> dict[str, str]:
    """``{component: text or digest}`` identifying a training run for its checkpoints: the
    ``model`` description, the initial ``params`` and the ``optimizer`` (``optimizer_digest``)
    digested, and every further component as given when it is text, else digested (arrays,
    keys, pytrees such as a target EBM); None components are left out."""
    out = {
        "model": model,
        "initial parameters": digest(params),
        "optimizer": optimizer_digest(optimizer, params),
    }
    for name, value in components.items():
        if value is not None:
            out[name.replace("_", " ")] = value if isinstance(value, str) else digest(value)
    return out


def write_atomically(path: Path, data: bytes, keep_previous: bool = False) -> None:
    """Writes ``data`` to ``path`` through a temporary file renamed over it (never a truncated
    ``path``); with ``keep_previous`` the old file is kept as ``*.prev``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, path.with_suffix(".prev"))
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict, fingerprint: dict) -> None:
    """Parameters, optimiser state, carry, step and history, with a checksum, atomically (the
    previous checkpoint kept as ``*.prev``)."""
    payload = pickle.dumps(
        {
            **jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state", "carry")}),
            "step": state["step"],
            "history": state["history"],
            "fingerprint": fingerprint,
        }
    )
    blob = hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    write_atomically(path, blob, keep_previous=True)


def load_checkpoint(path: Path, fingerprint: dict | None) -> dict:
    """The state saved at ``path``; with ``fingerprint``, refused unless it matches.

    Raises:
        CheckpointError: a checksum mismatch (corrupted or truncated), or another run: the
            message names every component of the fingerprint that differs.
    """
    blob = path.read_bytes()
    checksum, _, payload = blob.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != checksum:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated (checksum mismatch); the previous one "
            f"is {path.with_suffix('.prev')}: move it to {path.name} to resume from it"
        )
    state = pickle.loads(payload)
    saved = state["fingerprint"]
    if fingerprint is not None and saved != fingerprint:
        if not isinstance(saved, dict):
            differ = ["the format (written by an older seqppl)"]
        else:
            names = saved.keys() | fingerprint.keys()
            differ = sorted(k for k in names if saved.get(k) != fingerprint.get(k))
        raise CheckpointError(
            f"checkpoint {path} belongs to another run ({', '.join(differ)} differ); use "
            "another checkpoint_dir, or the same settings to resume"
        )
    for name in ("params", "opt_state", "carry"):
        state[name] = jax.tree.map(jnp.asarray, state.get(name))
    return state


def optimise(
    loss_fn,
    params,
    *,
    steps: int,
    optimizer,
    fingerprint: dict | None = None,
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
        fingerprint: ``{component: digest}`` (``run_fingerprint``), what a checkpoint must match
            to be resumed; needed with ``checkpoint_dir``.
        metrics: ``metrics(params) -> {name: float}`` at every logged step (before its update).
        summarise: ``summarise(aux) -> {name: float}`` at every logged step (host side).
        should_stop: ``should_stop(history) -> str | None``, asked after every logged step; a
            message stops training there (the step's update is not applied).
        carry: a pytree of non-trained state that the loss reads (e.g. a frozen proposal's
            parameters), checkpointed with the rest.
        refresh: ``refresh(carry, params, aux) -> (carry, {name: float})`` at every logged step
            (host side): a new carry for the following steps and figures for the history.
        mesh: params, optimiser state and carry are replicated over its devices (the loss
            shards its own batch). On a mesh over several processes only the process holding
            its first device writes checkpoints (``checkpoint_dir`` must be shared by all, and
            a resume in which they would start from different steps is refused), and the
            returned parameters are copies on each process's own default device.

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
    if path is not None and fingerprint is None:
        raise ValueError("checkpoint_dir needs a fingerprint of the run (run_fingerprint)")
    if path is not None and path.exists():
        state = load_checkpoint(path, fingerprint)
    check_mesh(mesh)
    if path is not None and spans_processes(mesh):
        _check_same_step(state["step"], path)
    lead = is_lead_process(mesh)  # the one process that writes the run's checkpoints

    def checkpoint():  # every process takes the host copy (a gather if need be); lead writes
        arrays = jax.tree.map(to_host, {k: state[k] for k in ("params", "opt_state", "carry")})
        if lead:
            save_checkpoint(path, {**state, **arrays}, fingerprint)

    for name in ("params", "opt_state", "carry"):
        state[name] = replicate(state[name], mesh)
    bar = progress_bar(progress=progress, desc=desc, total=steps, initial=state["step"])
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
                checkpoint()
    except KeyboardInterrupt:
        if path is not None:
            checkpoint()
        raise
    finally:
        bar.close()
    if path is not None:
        checkpoint()
    history = {k: np.asarray(v) for k, v in state["history"].items()}
    history["step"] = history["step"].astype(int)
    return to_local(state["params"]), history, stopped


def _check_same_step(step: int, path: Path) -> None:
    """Refuses a resume in which the processes of one run start from different steps (a
    ``checkpoint_dir`` that not every process sees); every process calls it."""
    from jax.experimental import multihost_utils

    steps = to_host(multihost_utils.process_allgather(np.int32(step))).tolist()
    if len(set(steps)) > 1:
        raise CheckpointError(
            f"the processes would resume from different steps {steps} (process order): "
            f"{path.parent} must be a directory every process reads (a shared file system)"
        )


def _rewound(state, last_good):
    """``last_good`` with the history rows of its step and later dropped (they will be redone)."""
    keep = sum(1 for logged in state["history"]["step"] if logged < last_good["step"])
    history = {name: values[:keep] for name, values in state["history"].items()}
    return {**last_good, "history": history}
