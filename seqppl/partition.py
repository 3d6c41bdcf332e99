"""``sp.log_partition``: ``log Z`` of an EBM exactly, by importance sampling, or by SMC.

One entry point; every answer is a ``PartitionEstimate`` with a standard error, an interval,
the ESS, Pareto k-hat (ArviZ's PSIS), the ELBO and, when exact target samples exist, the EUBO
(docs/theory.md#variational-bounds: ``ELBO ≤ log Z ≤ EUBO``). Diagnostics that say not to trust
an estimate are issued as ``EstimateWarning`` and kept in ``estimate.messages``.
"""

from __future__ import annotations

import jax
import numpy as np

from seqppl.checks import check_choice, check_level
from seqppl.distributions import EBM
from seqppl.estimate import PartitionEstimate, check_sampler
from seqppl.importance import DRAWS_PER_CHUNK, importance_sampling
from seqppl.smc import sequential_monte_carlo

__all__ = ["log_partition", "METHODS", "MONTE_CARLO_ALIASES"]

METHODS = ("exact", "is", "smc")
"""The estimators of ``log Z``; ``"is"`` is importance sampling."""
MONTE_CARLO_ALIASES = {"mc": "is"}
"""``"mc"`` (the distillation report's name for its Monte Carlo mode) is accepted for ``"is"``;
``"is"`` is canonical here, ``"mc"`` in ``distillation_error`` and ``distill(evaluate=)``."""


def log_partition(
    ebm,
    method: str = "is",
    proposal=None,
    num_samples: int = 1000,
    key=None,
    *,
    level: float = 0.95,
    target_samples="auto",
    min_ess_fraction: float = 0.01,
    max_kept: int = 100_000,
    chunk_size: int = DRAWS_PER_CHUNK,
    defensive: float = 0.0,
    defensive_proposal=None,
    progress: bool | None = None,
    twist=None,
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    num_replicates: int = 16,
    upper_bound: str = "eubo",
    mesh=None,
) -> PartitionEstimate:
    """Estimates ``log Z = log Σ_y exp R(y)`` of ``ebm`` (batch shape ``()``).

    ``"exact"``: ``ebm.log_partition()`` (DP or enumeration), ``stderr = 0``. ``"is"``:
    ``Ẑ = (1/S) Σ_i exp(R(y_i) − log q(y_i))``, ``y_i ~ proposal``, streamed in chunks.
    ``"smc"``: sequential Monte Carlo over positions with optional twists (``seqppl.smc``).

    Args:
        ebm: the ``EBM``.
        method: ``"exact"``, ``"is"`` (canonical; ``"mc"`` is accepted) or ``"smc"``.
        proposal: an ``ARM`` over the same space and prompt (``"is"``/``"smc"``).
        num_samples: draws (IS) or particles over all replicates (SMC), at least 2.
        key: a PRNG key, ``jax.random.key(n)`` or ``jax.random.PRNGKey(n)`` (``"is"``/``"smc"``).
        level: coverage of ``interval`` (normal on the log scale).
        target_samples: for the EUBO: ``"auto"`` (exact draws from a lattice or enumerable EBM),
            ``None``, or int ``[M, T]`` exact draws you have.
        min_ess_fraction: warn when the ESS is below this fraction of the samples.
        max_kept: draws and weights kept in the estimate (k-hat, plots, ``to_datatree``).
        chunk_size: IS draws per chunk (memory is bounded by it, not by ``num_samples``).
        defensive, defensive_proposal: IS from ``(1 − α) q + α u`` with ``α = defensive`` and
            ``u`` the uniform policy (or ``defensive_proposal``): bounded weights.
        progress: IS progress bar over chunks (default: when there is more than one chunk).
        twist: SMC intermediate targets: None, ``"exact"`` (lattice EBM soft values), a
            lattice EBM approximating ``ebm`` (its exact twist: e.g. an n-gram fit to a
            neural proposal, constrained like the target), a ``TableTwist``
            (``sp.fit_twist``) or a causal ``twist_fn(tokens [P, T]) -> [P, T]`` (entry t
            estimates ``log Σ_{y' extends y[:t+1]} exp R(y')``).
        resampling, ess_threshold, num_replicates: SMC's scheme (``"multinomial"``,
            ``"stratified"``, ``"systematic"``), its trigger (resample when ESS <
            ``ess_threshold · P``) and the independent runs behind its standard error.
        upper_bound: SMC's ``eubo``: ``"eubo"`` (the proposal's, ``E_p[R − log q]``) or
            ``"csmc"`` (conditional SMC on exact target draws: ``E[log Ẑ_CSMC] ≥ log Z``,
            tighter, one more SMC run; ``seqppl.smc``). Both need exact target draws.
        mesh: a ``jax.sharding.Mesh``: IS draws (per chunk) or SMC replicates split over its
            devices (``seqppl.sharding``); the estimate equals the one-device estimate up to
            the order of floating-point sums. Ignored by ``"exact"``.

    Returns:
        A ``PartitionEstimate``.

    Raises:
        ValueError / TypeError: bad arguments; a proposal over another space or prompt; a
            proposal with probability 0 on a sequence the EBM supports (checked on spaces of
            up to 65,536 sequences and on the target samples); NaN or +∞ rewards.

    Warns:
        EstimateWarning: k-hat above ``min(1 − 1/log10 S, 0.7)``, fewer than 100 weights for
            k-hat, or an ESS below ``min_ess_fraction · S``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import seqppl as sp
        >>> space = sp.SequenceSpace(vocab_size=3, length=4, eos=False)
        >>> lat = sp.Lattice.markov(space, 1)
        >>> ebm = sp.EBM.from_table(lat, jnp.ones((lat.num_states, 3)))
        >>> arm = sp.ARM.from_table(lat, jnp.zeros((lat.num_states, 3)))
        >>> est = sp.log_partition(ebm, "is", arm, 2000, jax.random.key(0))
        >>> round(est.log_z, 4), round(float(ebm.log_partition()), 4)  # 4 + 4 log 3
        (8.3944, 8.3944)
    """
    method = check_choice("method", method, METHODS, MONTE_CARLO_ALIASES)
    level = check_level(level)
    if not isinstance(ebm, EBM):
        raise TypeError(f"ebm must be an EBM, got {type(ebm).__name__}")
    if method == "exact":
        log_z = float(np.asarray(ebm.log_partition()).reshape(()))
        return PartitionEstimate(
            log_z, 0.0, (log_z, log_z), float("nan"), float("nan"), None, None, 0, "exact", level
        )
    key = check_sampler(ebm, proposal, num_samples, key, max_kept)
    if defensive_proposal is not None and not (method == "is" and defensive > 0):
        raise ValueError("defensive_proposal needs method='is' and defensive > 0")
    key, target_key = jax.random.split(key)  # the EUBO's exact draws: an independent stream
    if method == "is":
        if twist is not None:
            raise ValueError("twist applies to method='smc' only")
        if upper_bound != "eubo":
            raise ValueError("upper_bound='csmc' applies to method='smc' only")
        return importance_sampling(
            ebm,
            proposal,
            num_samples,
            key,
            level=level,
            chunk_size=chunk_size,
            max_kept=max_kept,
            defensive=defensive,
            defensive_proposal=defensive_proposal,
            target_samples=target_samples,
            target_key=target_key,
            min_ess_fraction=min_ess_fraction,
            progress=progress,
            mesh=mesh,
        )
    if defensive:
        raise ValueError("defensive applies to method='is' only")
    return sequential_monte_carlo(
        ebm,
        proposal,
        num_samples,
        key,
        level=level,
        twist=twist,
        resampling=resampling,
        ess_threshold=ess_threshold,
        num_replicates=num_replicates,
        max_kept=max_kept,
        target_samples=target_samples,
        target_key=target_key,
        min_ess_fraction=min_ess_fraction,
        upper_bound=upper_bound,
        mesh=mesh,
    )
