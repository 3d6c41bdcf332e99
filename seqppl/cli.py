"""The ``seqppl`` command line: ``demo`` (the main job on an embedded default), ``reproduce``
(the paper's exact-risk experiments) and ``info``.

Bad arguments exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _nonnegative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected an integer >= 1, got 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqppl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="exact log Z and lookahead on a digit-sum-constrained bigram",
        description="Builds a bigram over digits constrained to a digit sum divisible by 3, "
        "computes log Z by dynamic programming next to brute-force enumeration, and shows how "
        "the soft values of M make the next-token distribution look ahead.",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller space (seconds)")
    demo.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the bigram")
    from seqppl.models.paper import CONFIGS, TARGETS

    reproduce = sub.add_parser(
        "reproduce",
        help="the paper's exact-risk experiments: teacher-forced ARM vs normalised EBM",
        description="Trains the Transformer EBM on the exact risk over every sequence, keeps its "
        "reward R*, trains the Transformer ARM and compares its logits with M(R*) at each logged "
        "step (THEORY §5). Writes OUT/metrics.csv, OUT/panels.png and OUT/summary.md.",
    )
    reproduce.add_argument("--config", choices=sorted(CONFIGS), default="v8t4-n2")
    reproduce.add_argument("--target", choices=TARGETS, default="zipf")
    reproduce.add_argument("--steps", type=_positive_int, default=5000)
    reproduce.add_argument("--lr", type=_positive_float, default=1e-2, help="peak learning rate")
    reproduce.add_argument("--seed", type=_nonnegative_int, default=0)
    reproduce.add_argument("--log-every", type=_positive_int, default=50)
    reproduce.add_argument(
        "--zipf-order",
        choices=("random", "lexicographic"),
        default="random",
        help="ranks of the Zipf target: a seeded permutation (THEORY §5) or enumeration order",
    )
    reproduce.add_argument("--out", default="reproduction", help="output folder")
    sub.add_parser("info", help="versions, JAX devices and float precision")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "reproduce":
        return _reproduce(parser, args)
    return _demo(quick=args.quick, seed=args.seed)


def _reproduce(parser, args) -> int:
    from pathlib import Path

    from seqppl.models.paper import reproduce

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error.strerror})")
    result = reproduce(
        args.config,
        args.target,
        args.steps,
        args.lr,
        args.seed,
        out,
        args.log_every,
        zipf_order=args.zipf_order,
    )
    print((out / "summary.md").read_text())
    print(f"metrics: {out / 'metrics.csv'}  plots: {out / 'panels.png'}")
    return 0 if result["step"].size else 1


def _info() -> int:
    import jax
    import numpyro

    import seqppl

    print(f"seqppl {seqppl.__version__}  jax {jax.__version__}  numpyro {numpyro.__version__}")
    print(f"python {sys.version.split()[0]}")
    print(f"devices: {', '.join(str(d) for d in jax.devices())}")
    print(f"float64 enabled: {jax.config.jax_enable_x64}")
    return 0


def _demo(quick: bool, seed: int) -> int:
    import jax.numpy as jnp
    import numpy as np

    import seqppl as sp
    from seqppl.models.tasks import digit_sum_task

    space = sp.SequenceSpace(vocab_size=4, length=4 if quick else 7, eos=True)
    task = digit_sum_task(space, modulus=3, seed=seed)
    lat, r = task.lattice, task.rewards
    print(f"Target: a random bigram over digits 0..3, at most {space.length} digits then EOS,")
    print("conditioned on 'the digit sum is divisible by 3'. Z = P_bigram(constraint holds).")
    print(
        f"{space.num_sequences:,} responses; lattice markov(1) x digit-sum DFA: "
        f"{lat.num_states} states x {space.num_actions} actions x T={space.horizon}\n"
    )

    start = time.perf_counter()
    values = sp.soft_values(lat, r).block_until_ready()
    dp_time = time.perf_counter() - start
    start = time.perf_counter()
    seqs = space.enumerate()
    brute = float(sp.logsumexp(lat.path_scores(r, seqs).sum(-1), -1))
    brute_time = time.perf_counter() - start
    log_z = float(values[0, lat.initial])
    print(f"log Z by dynamic programming : {log_z: .10f}   ({dp_time * 1e3:7.1f} ms)")
    print(f"log Z by enumeration         : {brute: .10f}   ({brute_time * 1e3:7.1f} ms)")
    print(f"P(digit sum divisible by 3) under the bigram = {np.exp(log_z):.4f}\n")

    q, _ = sp.soft_bellman(lat, r)
    bigram_next = sp.softmax(task.bigram_logits[lat.factors[0].initial])
    print("Next-token distribution at the start (digits 0 1 2 3, EOS):")
    print(f"  bigram alone     : {np.round(np.asarray(bigram_next), 3)}")
    print(f"  M(r), exact ARM  : {np.round(np.asarray(sp.softmax(q[0, lat.initial])), 3)}")
    prefix = np.array([2, 2, 1, 0][: space.length - 1])
    states = np.asarray(
        lat.states(np.concatenate([prefix, [space.eos_id] * (space.horizon - len(prefix))]))
    )
    t, s = len(prefix), states[len(prefix)]
    bigram_after = task.bigram_logits[prefix[-1]]  # markov(1) state = the last token
    print(f"After the prefix {prefix.tolist()} (digit sum {prefix.sum()}), decision {t}:")
    print(f"  bigram alone     : {np.round(np.asarray(sp.softmax(bigram_after)), 3)}")
    print(f"  M(r), exact ARM  : {np.round(np.asarray(sp.softmax(q[t, s])), 3)}")
    print("  (EOS is allowed only once the sum is divisible by 3; the soft values V(s+a)")
    print("   reweight each digit by how likely the constraint can still be met after it)\n")

    r_back = sp.inverse_soft_bellman(lat, q)
    rewards = lat.path_scores(r, seqs).sum(-1)
    back = lat.path_scores(r_back, seqs).sum(-1)
    finite = jnp.isfinite(rewards)
    same_support = bool(jnp.array_equal(finite, jnp.isfinite(back)))
    err = float(jnp.max(jnp.abs(jnp.where(finite, rewards - back, 0.0))))
    print(
        f"Round trip M⁻¹(M(r)): same support {same_support}, max |ΔR| = {err:.2e} "
        f"over {len(seqs):,} sequences"
    )
    return 0 if abs(log_z - brute) < 1e-4 * max(1.0, abs(log_z)) and same_support else 1


if __name__ == "__main__":
    sys.exit(main())
