"""ARM and EBM as NumPyro distributions over token sequences, and the exact conversions."""

from seqppl.distributions.arm import ARM
from seqppl.distributions.convert import NoExactARM, to_arm, to_ebm
from seqppl.distributions.ebm import EBM
from seqppl.distributions.nnx import nnx_arm
from seqppl.distributions.support import SequenceSupport

__all__ = ["ARM", "EBM", "SequenceSupport", "nnx_arm", "to_arm", "to_ebm", "NoExactARM"]
