"""Argument checks shared by every entry point, each spelled once (layer 1).

Validation is eager and happens at the public door: a ``ValueError`` or ``TypeError`` names the
argument, what was expected and what was given. Counts, PRNG keys (new-style
``jax.random.key(n)`` and NumPyro's legacy ``jax.random.PRNGKey(n)`` alike), numbers in an
interval (levels, fractions, rates), meshes, token and logits arrays (dtype and shape: static, so
checked under ``jit`` too), NaN/+∞ in scores (−∞ is a legal hard constraint; values are checked
where they are concrete, never under tracing) and a sequence model over the expected space and
prompt. Depends only on JAX and NumPy.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

__all__ = [
    "check_counts",
    "check_key",
    "check_number",
    "check_level",
    "check_choice",
    "check_mesh",
    "as_array",
    "check_tokens",
    "check_logits",
    "first_invalid",
    "refuse_invalid",
    "check_same_space",
    "check_model",
]


def check_counts(*counts: tuple[str, object, int]) -> None:
    """Each ``(name, value, least)``: ``value`` must be an int ≥ ``least`` (not a bool).

    >>> check_counts(("steps", 0, 1))
    Traceback (most recent call last):
    ...
    ValueError: steps must be an int >= 1, got 0
    """
    for name, value, least in counts:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def check_key(key, name: str = "key") -> jax.Array:
    """``key`` as one typed PRNG key: a ``jax.random.key(n)`` is returned as is, a legacy
    ``uint32[2]`` key (``jax.random.PRNGKey(n)``, NumPyro's habit) is wrapped, so both give the
    same stream (traced keys too).

    Raises:
        TypeError: anything else (an int, a float array, a batch of keys), naming ``name``.

    >>> import jax
    >>> legacy, typed = check_key(jax.random.PRNGKey(3)), jax.random.key(3)
    >>> bool((jax.random.key_data(legacy) == jax.random.key_data(typed)).all())
    True
    """
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(jnp.asarray(key))
        got = f"an array of dtype {key.dtype} and shape {key.shape}"
    else:
        got = f"{type(key).__name__} {key!r}"
    raise TypeError(
        f"{name} must be one PRNG key, jax.random.key(n) or jax.random.PRNGKey(n); got {got}"
    )


def check_number(name: str, value, low: float, high: float, closed: str = "()") -> float:
    """``value`` as a float in the interval from ``low`` to ``high``; ``closed`` gives its ends
    (``"()"``, ``"[)"``, ``"(]"`` or ``"[]"``). Bools, non-numbers and NaN are refused.

    >>> check_number("defensive", 0.1, 0, 1, "[)")
    0.1
    >>> check_number("learning_rate", float("nan"), 0, float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: learning_rate must be a number in (0, inf), got nan
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        above = value >= low if closed[0] == "[" else value > low
        below = value <= high if closed[1] == "]" else value < high
        ok = bool(above and below)  # NaN fails both comparisons
    if not ok:
        raise ValueError(
            f"{name} must be a number in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value!r}"
        )
    return float(value)


def check_level(level, name: str = "level") -> float:
    """The coverage of an interval: a number in (0, 1)."""
    return check_number(name, level, 0, 1, "()")


def check_choice(name: str, value, choices: tuple[str, ...], aliases=None) -> str:
    """``value`` if it is one of ``choices``, the canonical choice an alias stands for (``aliases``
    maps alias to choice), else a ``ValueError`` listing the choices.

    >>> check_choice("method", "mc", ("exact", "is", "smc"), {"mc": "is"})
    'is'
    """
    aliases = aliases or {}
    if isinstance(value, str) and value in aliases:
        return aliases[value]
    if isinstance(value, str) and value in choices:
        return value
    also = f" (or the alias{'es' if len(aliases) > 1 else ''} {', '.join(map(repr, aliases))})"
    raise ValueError(f"{name} must be one of {choices}{also if aliases else ''}, got {value!r}")


def check_mesh(mesh) -> Mesh | None:
    """``mesh`` itself (None: one device); ``TypeError`` unless a ``jax.sharding.Mesh``."""
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    return mesh


def as_array(name: str, value):
    """``value`` itself if it is an array (a traced one too), else ``np.asarray(value)``.

    Raises:
        ValueError: a ragged nested sequence (rows of different lengths), naming ``name``.

    >>> as_array("prompt", [[0, 1], [2]])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: prompt must be a rectangular array, got a ragged nested sequence ...
    """
    if isinstance(value, (jax.Array, np.ndarray)):
        return value
    try:
        array = np.asarray(value)
    except ValueError:
        raise ValueError(
            f"{name} must be a rectangular array, got a ragged nested sequence (rows of "
            "different lengths): pad the rows to one length or give them one at a time"
        ) from None
    if array.dtype == object:
        raise ValueError(f"{name} must be an array of ids, got an object array")
    if array.size == 0 and array.dtype == np.float64:  # `[]` is an empty sequence of ids
        array = array.astype(np.int32)
    return array


def check_tokens(tokens, space, name: str = "tokens") -> jax.Array:
    """``tokens`` as an int32 array ``[..., T]`` of ``space`` (``T = space.horizon``). Only the
    dtype and shape are checked (static: free, and valid under ``jit``); ids, EOS padding and
    support are ``log_prob``'s business (−∞ outside the support).

    Raises:
        TypeError: a dtype other than an integer one (floats, bools), naming ``name``.
        ValueError: a ragged nested sequence, or a last axis other than ``T``.

    >>> from seqppl import SequenceSpace
    >>> check_tokens([0, 1, 2], SequenceSpace(3, 3, eos=True))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tokens must have last dimension T=4 (at most L=3 tokens, then EOS=3), got ...
    """
    tokens = as_array(name, tokens)
    dtype = tokens.dtype
    if not jnp.issubdtype(dtype, jnp.integer):  # bool is not an integer dtype here
        raise TypeError(f"{name} must have an integer dtype (token ids), got {dtype}")
    T = space.horizon
    if tokens.ndim == 0 or tokens.shape[-1] != T:
        layout = f"at most L={space.length} tokens, then EOS={space.eos_id}" if space.eos else ""
        layout = layout or f"exactly L={space.length} tokens"
        raise ValueError(
            f"{name} must have last dimension T={T} ({layout}), got shape {tokens.shape}"
        )
    return jnp.asarray(tokens, jnp.int32)


def check_logits(logits, tokens, num_actions: int, name: str = "logits_fn") -> jax.Array:
    """``logits`` ``[..., T, A]`` returned by ``name`` for ``tokens [..., T]``: the shape is
    checked always (static), NaN and +∞ where the values are concrete (under tracing they pass
    unseen and make ``log_prob`` NaN).

    Raises:
        ValueError: the last two axes are not ``(T, A)`` (both widths named), or concrete NaN/+∞
            (the first one and the sequence it belongs to).
    """
    shape, T = jnp.shape(logits), jnp.shape(tokens)[-1]
    if len(shape) < 2 or shape[-2:] != (T, num_actions):
        raise ValueError(
            f"{name} returned logits of shape {shape} for tokens of shape {jnp.shape(tokens)}; "
            f"expected [..., T={T}, A={num_actions}]: one logit per action of the space, "
            f"got {shape[-1] if shape else 'none'}"
        )
    refuse_invalid(logits, f"{name}(tokens)", rows=tokens)
    return logits


def first_invalid(values, allow_pos_inf: bool = False) -> tuple[int, ...] | None:
    """Index of the first NaN (or +∞, unless ``allow_pos_inf``) in a concrete array, else None
    (also None for a traced value, which validation cannot see)."""
    if isinstance(values, jax.core.Tracer):
        return None
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        return None
    bad = np.isnan(values) if allow_pos_inf else np.isnan(values) | (values == np.inf)
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None


def refuse_invalid(
    values, what: str, *, rows=None, allow_pos_inf: bool = False, hint: str = ""
) -> None:
    """``ValueError`` when concrete ``values`` hold NaN (or +∞ unless ``allow_pos_inf``).

    The message names ``what`` (an argument such as ``"r"``, or an expression such as
    ``"reward_fn(tokens)"``), the first bad value and where it is: its full index (none for a
    0-d array), or, with ``rows`` (token sequences ``[*N, T]`` that ``values [*N, ...]`` belong
    to, ``N`` possibly empty), the sequence and the index within that sequence's values;
    ``hint`` (the likely cause and the remedy) is appended.

    >>> import numpy as np
    >>> refuse_invalid(np.array([0.0, np.nan]), "reward_fn(tokens)")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: reward_fn(tokens)[1] = nan: scores are finite or −∞ (a hard constraint), ...
    """
    index = first_invalid(values, allow_pos_inf)
    if index is None:
        return
    value = float(np.asarray(values)[index])
    rows = None if rows is None or isinstance(rows, jax.core.Tracer) else np.asarray(rows)
    lead = None if rows is None else rows.ndim - 1
    if rows is not None and lead <= len(index) and rows.shape[:lead] == np.shape(values)[:lead]:
        rest = index[lead:]
        sequence = rows[index[:lead]].tolist()
        where = f"{what}{list(rest) if rest else ''} = {value} on the sequence {sequence}"
    else:
        where = f"{what}{list(index) if index else ''} = {value}"
    allowed = "finite, +∞ or −∞" if allow_pos_inf else "finite or −∞ (a hard constraint)"
    never = "NaN" if allow_pos_inf else "NaN or +∞"
    raise ValueError(f"{where}: scores are {allowed}, never {never}{'; ' + hint if hint else ''}")


def check_same_space(name: str, space, expected) -> None:
    """``ValueError`` unless ``space == expected`` (the space of the model ``name`` must match)."""
    if space != expected:
        raise ValueError(f"{name} is over {space}, not {expected}")


def check_model(model, kind: type, expected, name: str) -> None:
    """``model`` is a ``kind`` (e.g. an ARM) over the space and prompt of ``expected`` (the EBM or
    model it must match), with batch shape ``()``.

    Raises:
        TypeError: ``model`` is not a ``kind``.
        ValueError: another space, a batch shape, or another prompt.
    """
    if not isinstance(model, kind):
        raise TypeError(f"{name} must be an {kind.__name__}, got {type(model).__name__}")
    check_same_space(name, model.space, expected.space)
    if model.batch_shape != ():
        raise ValueError(f"{name} has batch shape {model.batch_shape}; give one prompt")
    mine, theirs = model.prompt, expected.prompt
    same = (mine is None) == (theirs is None) and (
        mine is None
        or isinstance(mine, jax.core.Tracer)
        or isinstance(theirs, jax.core.Tracer)
        or np.array_equal(np.asarray(mine), np.asarray(theirs))
    )
    if not same:
        raise ValueError(f"{name} and the target have different prompts; give both the same")
