"""ARM and EBM as NumPyro distributions over token sequences, and the exact conversions."""

from seqppl.distributions.arm import ARM
from seqppl.distributions.convert import to_arm, to_ebm
from seqppl.distributions.ebm import EBM
from seqppl.distributions.logits import CachedLogits
from seqppl.distributions.nnx_arm import nnx_arm
from seqppl.distributions.routes import ExactRoute, NoExactARM, NoExactRoute
from seqppl.distributions.support import SequenceSupport

__all__ = [
    "ARM",
    "EBM",
    "SequenceSupport",
    "CachedLogits",
    "ExactRoute",
    "NoExactRoute",
    "NoExactARM",
    "nnx_arm",
    "to_arm",
    "to_ebm",
]
