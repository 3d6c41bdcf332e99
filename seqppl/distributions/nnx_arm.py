"""``nnx_arm``: a NumPyro primitive whose ARM's Flax NNX parameters are NumPyro sites.

The registration goes through ``numpyro.contrib.module.nnx_module`` (a ``param`` site, for SVI)
or ``random_nnx_module`` (``sample`` sites under a prior, for NUTS or SVI).
"""

from __future__ import annotations

from flax import nnx
from numpyro.contrib.module import nnx_module, random_nnx_module

from seqppl.distributions.arm import ARM

__all__ = ["nnx_arm"]


def nnx_arm(name: str, module: nnx.Module, space, prompt=None, *, prior=None, **kwargs):
    """A NumPyro primitive: an ARM whose module parameters are NumPyro sites.

    With ``prior=None`` the parameters are a ``numpyro.param`` site ``f"{name}$params"``
    (``numpyro.contrib.module.nnx_module``: SVI optimises them); with ``prior`` (a distribution,
    a dict of distributions, or ``(name, shape) -> distribution``) each parameter is a
    ``sample`` site ``f"{name}.{path}"`` (``random_nnx_module``: NUTS or SVI infer them). The
    scope divider is ``"."``, not NumPyro's default ``"/"``: ArviZ 1.x stores posteriors in an
    ``xarray.DataTree``, which refuses variable names containing ``"/"``.
    Extra keywords go to ``ARM.from_nnx``.

    Example:
        >>> import jax.numpy as jnp, numpyro
        >>> from numpyro.infer.util import log_density
        >>> from flax import nnx
        >>> from seqppl import SequenceSpace
        >>> space = SequenceSpace(vocab_size=2, length=2, eos=False)
        >>> class Unigram(nnx.Module):
        ...     def __init__(self):
        ...         self.w = nnx.Param(jnp.zeros(2))
        ...     def __call__(self, tokens):
        ...         return jnp.broadcast_to(self.w[...], (*tokens.shape, 2))
        >>> def model(y):
        ...     numpyro.sample("y", nnx_arm("lm", Unigram(), space), obs=y)
        >>> print(round(float(log_density(model, (jnp.array([0, 1]),), {}, {})[0]), 4))
        -1.3863
    """
    registered = (
        nnx_module(name, module)
        if prior is None
        else random_nnx_module(name, module, prior, scope_divider=".")
    )
    # Both return ``partial(apply_fn, params, ...)``: the registered (or sampled) pure dict.
    return ARM.from_nnx(module, space, prompt, params=registered.args[0], **kwargs)
