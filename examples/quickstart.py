"""Quickstart: one distribution written as an ARM and as an EBM, and the exact maps between them.

A bigram language model over the digits 0..4 (at most 6 of them, then EOS) is constrained to
responses whose digit sum is divisible by 3. The constrained model is an EBM (bigram log-probs
plus a 0/−∞ constraint); ``sp.to_arm`` turns it into the ARM that samples it exactly (the soft
Bellman map M looks ahead to what can still be completed); ``sp.to_ebm`` maps it back.

    python examples/quickstart.py [--quick] [--seed N]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from seqppl.models.tasks import digit_sum_lattice

import seqppl as sp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_samples = 2_000 if args.quick else 50_000

    space = sp.SequenceSpace(vocab_size=5, length=6, eos=True)
    bigram = sp.Lattice.markov(space, order=1)
    logits = jax.random.normal(jax.random.key(args.seed), (bigram.num_states, space.num_actions))
    reference = sp.ARM.from_table(bigram, logits)  # an ARM: logits on the bigram lattice

    # The EBM: reference · [digit sum ≡ 0 mod 3]. Exact log Z by one dynamic program.
    target = sp.to_ebm(reference).constrain(digit_sum_lattice(space, 3), accepting=[0])
    print(
        f"space: {space.num_sequences} sequences; product lattice: {target.joint.num_states} states"
    )
    # to_ebm keeps the scale of the logits: log Z of the unconstrained EBM is the root soft
    # value V_q(x) (0 only for normalised logits), so P(constraint) is a ratio of partitions.
    log_z, log_z_free = float(target.log_partition()), float(sp.to_ebm(reference).log_partition())
    print(f"log Z = {log_z:.6f}; unconstrained log Z = V_q(x) = {log_z_free:.6f}")
    print(f"P_reference(digit sum ≡ 0 mod 3) = {np.exp(log_z - log_z_free):.6f}")

    # M: the exact ARM of the constrained model; sampling it never violates the constraint.
    arm = sp.to_arm(target)
    y = arm.sample(jax.random.key(args.seed + 1), (num_samples,))
    digit_sums = np.asarray(jnp.where(space.active(y) & (y < space.vocab_size), y, 0).sum(-1))
    print(
        f"{num_samples} samples, all digit sums divisible by 3: {bool(np.all(digit_sums % 3 == 0))}"
    )

    # Both forms give the same log-probabilities; the reference's mass is renormalised.
    gap = float(jnp.max(jnp.abs(arm.log_prob(y[:100]) - target.log_prob(y[:100]))))
    print(f"max |log p_ARM - log p_EBM| on 100 samples: {gap:.2e}")
    everything = jnp.asarray(space.enumerate())
    total = float(jax.scipy.special.logsumexp(arm.log_prob(everything)))
    print(f"log sum_y p_ARM(y) over all sequences: {total:.2e}")

    # Samples match the exact probabilities: empirical vs exact frequency of the top sequences.
    seqs, counts = np.unique(np.asarray(y), axis=0, return_counts=True)
    top = np.argsort(-counts)[:3]
    for i in top:
        exact = float(jnp.exp(arm.log_prob(seqs[i])))
        print(f"  {seqs[i].tolist()}: empirical {counts[i] / num_samples:.4f}, exact {exact:.4f}")

    # M⁻¹ back to an EBM: the same distribution; its log Z is the ARM's root soft value, which
    # for q = M(r) is the target's log Z again.
    back = sp.to_ebm(arm)
    gap_back = float(jnp.max(jnp.abs(back.log_prob(y[:100]) - target.log_prob(y[:100]))))
    print(
        f"to_ebm(to_arm(target)): log Z = {float(back.log_partition()):.6f}, "
        f"max log-prob gap {gap_back:.2e}"
    )


if __name__ == "__main__":
    main()
