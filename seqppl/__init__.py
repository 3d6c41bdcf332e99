"""seqppl: autoregressive and energy-based sequence models as interchangeable NumPyro distributions.

The soft Bellman map links the two (docs/theory.md#the-soft-bellman-bijection): ARM logits
``q = M(r)`` of EBM local rewards ``r``, computed exactly by dynamic programming on finite-state
lattices.
"""

from seqppl.bellman import inverse_soft_bellman, occupancy, path_rewards, soft_bellman, soft_values
from seqppl.diagnostics import EstimateWarning
from seqppl.distill import DistillationStopped, distill
from seqppl.distillation_report import distillation_error
from seqppl.distributions import (
    ARM,
    EBM,
    CachedLogits,
    ExactRoute,
    NoExactARM,
    NoExactRoute,
    SequenceSupport,
    nnx_arm,
    to_arm,
    to_ebm,
)
from seqppl.estimate import PartitionEstimate
from seqppl.lattice import MAX_PREFIX_TREE_CELLS, Lattice
from seqppl.logspace import log_softmax, logsumexp, softmax
from seqppl.masking import masked_arm
from seqppl.masking_report import ConstraintReport, constraint_report
from seqppl.partition import log_partition
from seqppl.posterior_comparison import PosteriorComparison, compare_posteriors
from seqppl.report import DistillationReport, plot_distillation_history
from seqppl.space import MAX_ENUMERATE, SequenceSpace
from seqppl.student_posterior import distillation_posterior, student_summary
from seqppl.table_twist import TableTwist, fit_twist
from seqppl.train import fit

__version__ = "0.1.0"

__all__ = [
    "SequenceSpace",
    "ARM",
    "EBM",
    "SequenceSupport",
    "CachedLogits",
    "ExactRoute",
    "NoExactRoute",
    "NoExactARM",
    "to_arm",
    "to_ebm",
    "nnx_arm",
    "MAX_ENUMERATE",
    "Lattice",
    "MAX_PREFIX_TREE_CELLS",
    "soft_bellman",
    "soft_values",
    "inverse_soft_bellman",
    "path_rewards",
    "occupancy",
    "logsumexp",
    "log_softmax",
    "softmax",
    "fit",
    "log_partition",
    "PartitionEstimate",
    "EstimateWarning",
    "fit_twist",
    "TableTwist",
    "distill",
    "distillation_error",
    "DistillationReport",
    "DistillationStopped",
    "plot_distillation_history",
    "masked_arm",
    "constraint_report",
    "ConstraintReport",
    "compare_posteriors",
    "PosteriorComparison",
    "distillation_posterior",
    "student_summary",
]
