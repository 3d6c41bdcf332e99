"""Calibration of the log Z estimators and their warnings over seeds (docs/partition.md).

A tilted bigram EBM ``p_R ∝ base(y) · exp Σ_t r(y_{t−1}, y_t)`` over V = 6 tokens, T = 10
positions (fixed length, and with EOS), and three proposals: ``good`` (the exact ARM of the
EBM with N(0, 0.3²) noise on its logits), ``base`` (the untilted bigram) and ``sharp`` (the
base logits × 4, a proposal far too confident). For each estimator (importance sampling; SMC
without a twist and with the exact twist) and seed it records whether the nominal 95% interval
covers the exact log Z, whether a warning was raised, and k-hat. A trustworthy estimator covers
about 95% of the time when it is silent, and warns when it does not cover.

    python benchmarks/calibration.py --seeds 30 --num-samples 4000
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import seqppl as sp

V, T = 6, 10
PROPOSALS = ("good", "base", "sharp")
ESTIMATORS = {"is": ("is", None), "smc": ("smc", None), "smc, exact twist": ("smc", "exact")}


def problem(eos: bool):
    """``(ebm, {name: proposal ARM})`` of the study (fixed seeds: the same problem every run)."""
    space = sp.SequenceSpace(V, T, eos=eos)
    lat = sp.Lattice.markov(space, 1)
    rng = np.random.default_rng(0)
    shape = (lat.num_states, space.num_actions)
    base_logits = rng.standard_normal(shape)
    base = sp.ARM.from_table(lat, jnp.asarray(base_logits))
    ebm = base.tilt(sp.EBM.from_table(lat, jnp.asarray(0.5 * rng.standard_normal(shape))))
    exact = np.asarray(sp.to_arm(ebm).log_policy_table())
    noise = 0.3 * np.random.default_rng(1).standard_normal(exact.shape)
    return ebm, {
        "good": sp.ARM.from_table(lat, jnp.asarray(exact + noise)),
        "base": base,
        "sharp": sp.ARM.from_table(lat, jnp.asarray(4 * base_logits)),
    }


def calibration(ebm, proposal, estimator: str, seeds, num_samples: int):
    """``(covered [n], warned [n], khat [n])`` over ``seeds`` for one estimator of ESTIMATORS."""
    method, twist = ESTIMATORS[estimator]
    exact = float(ebm.log_partition())
    options = {} if method == "is" else {"twist": twist}
    rows = []
    for seed in seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.EstimateWarning)
            est = sp.log_partition(
                ebm, method, proposal, num_samples, jax.random.key(seed), **options
            )
        low, high = est.interval
        rows.append((low <= exact <= high, bool(est.messages), est.khat))
    covered, warned, khat = (np.array(column) for column in zip(*rows, strict=True))
    return covered, warned, khat


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30, help="seeds per row (default: 30)")
    parser.add_argument(
        "--num-samples", type=int, default=4000, help="draws or particles (default: 4000)"
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    print("| space | proposal | estimator | covers | warns | covers when silent | k-hat (median) |")
    print("|---|---|---|---|---|---|---|")
    for eos in (False, True):
        ebm, proposals = problem(eos)
        for name in PROPOSALS:
            for estimator in ESTIMATORS:
                covered, warned, khat = calibration(
                    ebm, proposals[name], estimator, range(args.seeds), args.num_samples
                )
                silent = ~warned
                median = f"{np.nanmedian(khat):.2f}" if np.isfinite(khat).any() else "NaN"
                nan = f" ({np.isnan(khat).sum()} NaN)" if np.isnan(khat).any() else ""
                print(
                    f"| {'EOS' if eos else 'fixed'} | {name} | {estimator} | "
                    f"{covered.sum()}/{covered.size} | {warned.sum()}/{warned.size} | "
                    f"{covered[silent].sum()}/{silent.sum()} | {median}{nan} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
