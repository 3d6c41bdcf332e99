"""The paper's exact-risk experiments (docs/theory.md#the-papers-experiments): teacher-forced
ARM vs exactly normalised EBM.

``reproduce(config, target, ...)`` trains the Transformer EBM on the exact risk over every
sequence, keeps its final reward ``R*``, then trains the Transformer ARM and, at every logged
step k, compares its logits ``q_k`` with ``R*``:

- ``arm_gap``, ``ebm_gap``: ``L − H(ρ)`` of each model at step k (each from its own run);
- ``before_map``: ``max_y |c(Σ_t q_k(s_t, y_t)) − c(R*(y))|``, raw logits, ``c`` subtracting the
  uniform mean over sequences;
- ``after_map``: ``max_s max_a |c_s(q_k(s, ·)) − c_s(M(r*)(s, ·))|`` over all prefixes, ``r*``
  putting all of ``R*`` on the last decision, ``c_s`` subtracting the mean over actions;
- ``kl = KL(p_{R*} ‖ p_{q_k})`` and ``bound = 2T · after_map``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from seqppl.models.transformer import TransformerARM, TransformerEBM

import seqppl as sp
from seqppl import checks, loop

__all__ = [
    "ADAM_B2",
    "CONFIGS",
    "TARGETS",
    "METRICS",
    "PaperConfig",
    "paper_target",
    "distance_metrics",
    "reproduce",
    "panels_figure",
]


@dataclass(frozen=True)
class PaperConfig:
    """A space (``V``, ``T``, fixed length) and Transformer sizes ``N, H, D, F``."""

    vocab_size: int
    length: int
    layers: int
    heads: int
    dim: int
    mlp_dim: int


CONFIGS = {
    "v8t4-n2": PaperConfig(8, 4, 2, 2, 16, 16),
    "v8t4-n3": PaperConfig(8, 4, 3, 4, 64, 64),
    "v4t8-n2": PaperConfig(4, 8, 2, 2, 16, 16),
    "v4t8-n3": PaperConfig(4, 8, 3, 4, 64, 64),
}
TARGETS = ("zipf", "normal")
METRICS = ("step", "arm_gap", "ebm_gap", "before_map", "after_map", "kl", "bound")
ZIPF_EXPONENT = 1.15
ADAM_B2 = 0.95
NORMAL_TEMPERATURE = 0.1


def paper_target(
    space: sp.SequenceSpace, target: str, seed: int = 0, zipf_order: str = "random"
) -> jax.Array:
    """``log ρ`` ``[N]`` over ``space.enumerate()``: ``"zipf"`` (``ρ ∝ rank^-1.15``, ranks a
    seeded permutation (docs/theory.md#the-papers-experiments), or with
    ``zipf_order="lexicographic"`` the enumeration order) or ``"normal"`` (``softmax(z / 0.1)``,
    ``z ~ N(0, I)`` seeded)."""
    n = space.num_sequences
    rng = np.random.default_rng(seed)
    if zipf_order not in ("random", "lexicographic"):
        raise ValueError(f"zipf_order must be 'random' or 'lexicographic', got {zipf_order!r}")
    if target == "zipf":
        ranks = rng.permutation(n) + 1 if zipf_order == "random" else np.arange(n) + 1
        logits = -ZIPF_EXPONENT * np.log(ranks)
    elif target == "normal":
        logits = rng.standard_normal(n) / NORMAL_TEMPERATURE
    else:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))


def distance_metrics(space, tree, log_rho, m_of_r, r_star):
    """The ARM-side metrics (docs/theory.md#reproduction-metrics) against the fixed EBM reward
    ``R*``."""
    seqs = jnp.asarray(space.enumerate())
    states = tree.states(seqs)  # [N, T]
    target_logits = m_of_r[jnp.arange(space.horizon), states]  # M(r*) at every prefix [N, T, A]
    log_p_star = r_star - sp.logsumexp(r_star, 0)
    horizon = space.horizon

    def centred(x, axis):
        return x - x.mean(axis=axis, keepdims=True)

    def metrics(arm):
        logits = arm.logits(seqs)  # raw network outputs [N, T, A]
        path = jnp.take_along_axis(logits, seqs[..., None], -1)[..., 0].sum(-1)
        before = jnp.max(jnp.abs(centred(path, 0) - centred(r_star, 0)))
        after = jnp.max(jnp.abs(centred(logits, -1) - centred(target_logits, -1)))
        kl = jnp.sum(jnp.exp(log_p_star) * (log_p_star - arm.log_prob(seqs)))
        return {
            "before_map": float(before),
            "after_map": float(after),
            "kl": float(kl),
            "bound": float(2 * horizon * after),
        }

    return metrics


def reproduce(
    config: str = "v8t4-n2",
    target: str = "zipf",
    steps: int = 5000,
    lr: float = 1e-2,
    seed: int = 0,
    out=None,
    log_every: int = 50,
    progress: bool = True,
    zipf_order: str = "random",
    adam_b2: float = ADAM_B2,
    checkpoint_every: int = 500,
) -> dict:
    """Run one configuration/target pair; returns the metrics as a dict of arrays ``METRICS``.

    Both models use Adam with second-moment decay ``adam_b2`` on the paper's trapezoid schedule
    (100 warm-up steps, constant ``lr``, 100 decay steps). The paper does not state β₂; with
    optax's 0.999, full-batch Adam at lr 1e-2 spikes and v8t4-n2 Zipf with lexicographic ranks
    (``zipf_order="lexicographic"``) ends with after-map 0.07–0.14 over three seeds, with 0.95
    at 0.016–0.023 (docs/reproduction.md).

    With ``out``, writes ``out/metrics.csv``, ``out/panels.png`` and ``out/summary.md``, and
    checkpoints both trainings every ``checkpoint_every`` steps under ``out/checkpoints`` (kept
    at the end, with ``run.json``, the settings): the same call again resumes an interrupted
    run (Ctrl-C writes a checkpoint at once; bit-identical on CPU), or rewrites a finished
    run's files without training.

    Raises:
        ValueError: an unknown config, target or zipf_order, ``steps``, ``log_every`` or
            ``checkpoint_every`` not an int ≥ 1, ``lr ≤ 0``, ``adam_b2`` outside (0, 1).
        seqppl.loop.CheckpointError: ``out/checkpoints`` holds checkpoints of a run with other
            settings, or a corrupted one.
    """
    checks.check_choice("config", config, tuple(sorted(CONFIGS)))
    checks.check_number("lr", lr, 0, float("inf"))
    checks.check_number("adam_b2", adam_b2, 0, 1)
    checks.check_counts(
        ("steps", steps, 1), ("log_every", log_every, 1), ("checkpoint_every", checkpoint_every, 1)
    )
    cfg = CONFIGS[config]
    started = time.perf_counter()
    settings = {
        "config": config,
        "target": target,
        "zipf_order": zipf_order,
        "steps": steps,
        "lr": float(lr),
        "adam_b2": float(adam_b2),
        "seed": int(seed),
        "log_every": log_every,
    }
    space = sp.SequenceSpace(cfg.vocab_size, cfg.length, eos=False)
    log_rho = paper_target(space, target, seed, zipf_order)
    checkpoints, resumed = (None, False) if out is None else _checkpoint_folder(Path(out), settings)
    entropy = float(-(jnp.exp(log_rho) * log_rho).sum())
    sizes = (cfg.layers, cfg.heads, cfg.dim, cfg.mlp_dim)
    key = jax.random.key(seed)
    optimizer = optax.adam(loop.trapezoid_schedule(lr, steps), b2=adam_b2)

    def fit(dist, name, metrics=None):
        folder = None if checkpoints is None else checkpoints / name
        return sp.fit(
            dist,
            target=log_rho,
            steps=steps,
            key=key,
            optimizer=optimizer,
            log_every=log_every,
            checkpoint_dir=folder,
            checkpoint_every=checkpoint_every,
            metrics=metrics,
            progress=progress,
        )

    ebm_module = TransformerEBM(space.num_actions, space.horizon + 1, *sizes, rngs=nnx.Rngs(seed))
    ebm, ebm_history = fit(sp.EBM.from_nnx(ebm_module, space), "ebm")
    seqs = jnp.asarray(space.enumerate())
    r_star = ebm.unnormalized_log_prob(seqs)
    tree_arm = sp.to_arm(ebm)  # M on the prefix tree with R* on each sequence's last decision
    metrics = distance_metrics(space, tree_arm.lattice, log_rho, tree_arm.params, r_star)
    arm_module = TransformerARM(space.num_actions, space.horizon, *sizes, rngs=nnx.Rngs(seed + 1))
    _, arm_history = fit(sp.ARM.from_nnx(arm_module, space), "arm", metrics)
    result = {
        "step": arm_history["step"],
        "arm_gap": arm_history["loss"] - entropy,
        "ebm_gap": ebm_history["loss"] - entropy,
        **{name: arm_history[name] for name in ("before_map", "after_map", "kl", "bound")},
    }
    if out is not None:
        timing_file = checkpoints / "timing.json"
        if timing_file.exists():  # a finished run, rewritten
            timing = _read_json(timing_file)
        else:
            timing = {
                "wall": time.perf_counter() - started,
                "ebm": float(ebm_history["seconds"][-1]),
                "arm": float(arm_history["seconds"][-1]),
                "resumed": resumed,
            }
            _write_json(timing_file, timing)
        _write(Path(out), result, settings, timing)
    return result


def _checkpoint_folder(out: Path, settings: dict) -> tuple[Path, bool]:
    """``(out/checkpoints, whether it holds checkpoints to resume)``; ``run.json`` there holds
    the settings of the run whose checkpoints they are, and other settings are refused."""
    folder = out / "checkpoints"
    run_file = folder / "run.json"
    resumable = any((folder / model / loop.CHECKPOINT_NAME).exists() for model in ("ebm", "arm"))
    if resumable and run_file.exists():
        saved = _read_json(run_file)
        changed = {
            name: (saved.get(name), settings.get(name))
            for name in saved.keys() | settings.keys()
            if saved.get(name) != settings.get(name)
        }
        if changed:
            raise loop.CheckpointError(
                f"out={str(out)!r} holds checkpoints of a run with other settings "
                f"({{setting: (saved, now)}} = {changed}); use another out or delete {folder}"
            )
    else:  # nothing to resume: this run's settings
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "timing.json").unlink(missing_ok=True)
        _write_json(run_file, settings)
    return folder, resumable


def _write_json(path: Path, value: dict) -> None:
    """Atomic (``loop.write_atomically``): never a truncated ``path``."""
    loop.write_atomically(path, json.dumps(value, indent=1).encode())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise loop.CheckpointError(f"{path} is not valid JSON ({error}); delete it") from None


def panels_figure(result: dict, settings: dict):
    """``panels.png``: the risk gaps (left) and the ARM's logit distances to ``M(R*)`` with the
    KL and its bound ``2T·after_map`` (right, grey dashed), each on its own labelled log scale;
    ``result`` maps ``METRICS`` to ``[steps]`` arrays, ``settings`` holds the run's settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for name in ("arm_gap", "ebm_gap"):
        left.semilogy(result["step"], np.maximum(result[name], 1e-8), label=name)
    left.set(xlabel="step", ylabel="L − H(ρ) (nats)", title="risk gaps (own y scale)")
    for name in ("before_map", "after_map", "kl"):
        right.semilogy(result["step"], np.maximum(result[name], 1e-8), label=name)
    bound = np.maximum(result["bound"], 1e-8)
    right.semilogy(result["step"], bound, "--", color="0.5", label="bound 2T·after_map")
    right.set(xlabel="step", ylabel="nats", title="ARM logits vs M(R*) (own y scale)")
    for ax in (left, right):
        ax.legend(frameon=False, fontsize="small")
    run = SimpleNamespace(**settings)
    fig.suptitle(
        f"{run.config}, {run.target} target, {run.steps} steps, lr {run.lr}, β₂ {run.adam_b2}, "
        f"seed {run.seed}"
    )
    return fig


def _write(out: Path, result, settings, timing):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS)
        for row in zip(*(result[name] for name in METRICS), strict=True):
            writer.writerow([int(row[0]), *(f"{v:.6g}" for v in row[1:])])
    fig = panels_figure(result, settings)
    fig.savefig(out / "panels.png", dpi=120)
    plt.close(fig)
    run = SimpleNamespace(**settings)
    final = {name: float(result[name][-1]) for name in METRICS[1:]}
    kl_ok = bool(np.all(result["kl"] <= result["bound"] + 1e-6))
    lines = [
        f"# Reproduction: {run.config}, {run.target} target",
        "",
        f"{run.steps} steps, Adam (β₂ = {run.adam_b2}) with the trapezoid schedule at lr "
        f"{run.lr}, seed {run.seed}.",
        "",
        "| metric | final value |",
        "|---|---|",
        *(f"| {name} | {value:.3g} |" for name, value in final.items()),
        "",
        f"kl ≤ bound at every logged step: {kl_ok}; "
        f"after-map / before-map at the end: {final['after_map'] / final['before_map']:.3g}",
        "",
        (
            f"wall time of the last call {timing['wall']:.0f} s, resumed from "
            f"{out / 'checkpoints'} (the time before the interruption is not counted)"
            if timing["resumed"]
            else f"wall time {timing['wall']:.0f} s (EBM training {timing['ebm']:.0f} s, ARM "
            f"training with the metrics {timing['arm']:.0f} s)"
        )
        + f" on {jax.devices()[0].device_kind}, jax {jax.__version__}",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
