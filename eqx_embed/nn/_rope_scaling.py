"""Hugging Face's RoPE scaling rules, in float64.

`transformers` reads a `rope_scaling` (v4) or `rope_parameters` (v5) dict from a model's
`config.json` and turns it into the inverse frequencies of the rotation and an
attention factor that multiplies cos and sin (`transformers/modeling_rope_utils.py`).
This module parses the same dicts and applies the same rules, in float64 NumPy rather
than float32 torch, so that the tables built from them are exact to the last bit of
their dtype.

Some values that the rules need live in the model config rather than in the dict;
they are accepted in the dict under the same names:

- `original_max_position_embeddings`: the context length the model was pretrained
    with. Required by `dynamic` (where transformers uses the config's
    `max_position_embeddings`), `yarn`, `longrope` and `llama3`.
- `max_position_embeddings`: the config's extended context length, needed only by
    `yarn` and `longrope` when `factor` is missing (Phi-3 style): the factor is then
    `max_position_embeddings / original_max_position_embeddings`.
- `rope_theta` and `partial_rotary_factor` (transformers 5 moves them into the dict):
    these describe the module itself, and are reconciled with its `theta` and
    `rotary_dim` arguments by `RotaryPositionalEmbedding`. The one exception is
    `proportional` (Gemma 4), whose `partial_rotary_factor` belongs to the rule: it
    rotates every feature, the trailing pairs with frequency zero.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._contracts import check_positive

# Keys that say which rule applies, or that describe the module rather than the rule.
_TYPE_KEYS = frozenset({"type", "rope_type"})
_MODULE_KEYS = frozenset({"rope_theta", "partial_rotary_factor"})

RopeTables = tuple[np.ndarray, float]
"""Inverse frequencies, float64 of shape `(rotary_dim // 2,)`, and attention factor."""


@dataclass(frozen=True)
class RopeScaling:
    """A parsed, validated scaling dict."""

    rope_type: str
    parameters: Mapping[str, Any]
    rope_theta: float | None
    partial_rotary_factor: float | None


def default_inverse_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
    """`1 / theta ** (2i / rotary_dim)` for `i < rotary_dim // 2`, in float64."""
    return 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def _number(parameters: Mapping[str, Any], name: str, rope_type: str) -> float:
    value = parameters[name]
    check_positive(f"rope_type {rope_type!r}'s scaling[{name!r}]", value)
    return float(value)


def _factor_or_ratio(parameters: Mapping[str, Any], rope_type: str) -> float:
    """`factor`, or, where it is missing or null, the ratio of the context lengths."""
    if parameters.get("factor") is not None:
        return _number(parameters, "factor", rope_type)
    if "max_position_embeddings" not in parameters:
        raise ValueError(
            f"rope_type {rope_type!r} needs `factor`, or `max_position_embeddings` "
            "(the model config's) to compute it as max_position_embeddings / "
            "original_max_position_embeddings; got neither."
        )
    return _number(parameters, "max_position_embeddings", rope_type) / _number(
        parameters, "original_max_position_embeddings", rope_type
    )


def _default(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    return default_inverse_frequencies(rotary_dim, theta), 1.0


def _linear(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    factor = _number(parameters, "factor", "linear")
    return default_inverse_frequencies(rotary_dim, theta) / factor, 1.0


def _dynamic(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    factor = _number(parameters, "factor", "dynamic")
    original = _number(parameters, "original_max_position_embeddings", "dynamic")
    if rotary_dim <= 2:
        raise ValueError(
            f"rope_type 'dynamic' needs rotary_dim > 2 (its base is raised to the "
            f"power rotary_dim / (rotary_dim - 2)), got rotary_dim={rotary_dim}."
        )
    # Transformers rescales the base for the current sequence length, never below the
    # original context; the tables are those for a sequence of max_seq_len.
    seq_len = max(max_seq_len, original)
    base = theta * (factor * seq_len / original - (factor - 1)) ** (
        rotary_dim / (rotary_dim - 2)
    )
    return default_inverse_frequencies(rotary_dim, base), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    factor = _factor_or_ratio(parameters, "yarn")
    original = _number(parameters, "original_max_position_embeddings", "yarn")
    attention_factor = parameters.get("attention_factor")
    mscale = parameters.get("mscale")
    mscale_all_dim = parameters.get("mscale_all_dim")
    if attention_factor is None:
        # As transformers: the ratio only when both are given and non-zero.
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(
                factor, float(mscale_all_dim)
            )
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = float(parameters.get("beta_fast") or 32)
    beta_slow = float(parameters.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip(
        (np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1
    )
    extrapolation = 1 - ramp
    inverse = default_inverse_frequencies(rotary_dim, theta)
    mixed = (inverse / factor) * (1 - extrapolation) + inverse * extrapolation
    return mixed, float(attention_factor)


def _longrope(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    original = _number(parameters, "original_max_position_embeddings", "longrope")
    factor = _factor_or_ratio(parameters, "longrope")
    attention_factor = parameters.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0
            if factor <= 1.0
            else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    # Transformers switches to the long factors once the sequence outgrows the
    # original context; the tables are those for a sequence of max_seq_len.
    name = "long_factor" if max_seq_len > original else "short_factor"
    for key in ("short_factor", "long_factor"):
        values = np.asarray(parameters[key], dtype=np.float64)
        if values.shape != (rotary_dim // 2,):
            raise ValueError(
                f"scaling[{key!r}] must be a list of rotary_dim // 2 = "
                f"{rotary_dim // 2} numbers, got shape {values.shape}."
            )
    extension = np.asarray(parameters[name], dtype=np.float64)
    return default_inverse_frequencies(rotary_dim, theta) / extension, float(
        attention_factor
    )


def _llama3(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    factor = _number(parameters, "factor", "llama3")
    low_freq_factor = _number(parameters, "low_freq_factor", "llama3")
    high_freq_factor = _number(parameters, "high_freq_factor", "llama3")
    original = _number(parameters, "original_max_position_embeddings", "llama3")
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            "scaling['high_freq_factor'] must be greater than "
            f"scaling['low_freq_factor'], got {high_freq_factor} <= {low_freq_factor}."
        )
    inverse = default_inverse_frequencies(rotary_dim, theta)
    wavelength = 2 * math.pi / inverse
    # Short wavelengths keep their frequency, long ones are divided by the factor, and
    # those in between are interpolated smoothly.
    scaled = np.where(
        wavelength > original / low_freq_factor, inverse / factor, inverse
    )
    smooth = (original / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= original / high_freq_factor) & (
        wavelength <= original / low_freq_factor
    )
    return np.where(is_medium, smoothed, scaled), 1.0


def _proportional(parameters, *, rotary_dim, theta, max_seq_len) -> RopeTables:
    factor = parameters.get("factor")
    factor = 1.0 if factor is None else _number(parameters, "factor", "proportional")
    proportion = parameters.get("partial_rotary_factor")
    proportion = (
        1.0
        if proportion is None
        else _number(parameters, "partial_rotary_factor", "proportional")
    )
    if proportion > 1:
        raise ValueError(
            "scaling['partial_rotary_factor'] must be at most 1 for rope_type "
            f"'proportional', got {proportion}."
        )
    # The first pairs get the frequencies that a full rotation of rotary_dim features
    # would give them (the exponent's denominator stays rotary_dim); the others get
    # frequency zero, so cos = 1 and sin = 0 pass them through.
    rotated = int(proportion * rotary_dim // 2)
    inverse = np.zeros(rotary_dim // 2, dtype=np.float64)
    inverse[:rotated] = default_inverse_frequencies(rotary_dim, theta)[:rotated]
    return inverse / factor, 1.0


@dataclass(frozen=True)
class _Rule:
    required: frozenset[str]
    optional: frozenset[str]
    compute: Callable[..., RopeTables]


_RULES: dict[str, _Rule] = {
    "default": _Rule(frozenset(), frozenset(), _default),
    "linear": _Rule(frozenset({"factor"}), frozenset(), _linear),
    "dynamic": _Rule(
        frozenset({"factor", "original_max_position_embeddings"}), frozenset(), _dynamic
    ),
    "yarn": _Rule(
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset(
            {
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
                "max_position_embeddings",
            }
        ),
        _yarn,
    ),
    "longrope": _Rule(
        frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"factor", "attention_factor", "max_position_embeddings"}),
        _longrope,
    ),
    "llama3": _Rule(
        frozenset(
            {
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            }
        ),
        frozenset(),
        _llama3,
    ),
    "proportional": _Rule(
        frozenset(), frozenset({"factor", "partial_rotary_factor"}), _proportional
    ),
}

ROPE_TYPES = tuple(_RULES)
"""The scaling rules understood, by their Hugging Face `rope_type`."""


def parse_scaling(scaling: Mapping[str, Any] | None) -> RopeScaling:
    """Validates a Hugging Face `rope_scaling` / `rope_parameters` dict.

    **Arguments:**

    - `scaling`: the dict as it appears in `config.json`, with its rule named by
        `rope_type` or by the older `type` key, or `None` (no scaling).

    **Returns:**

    A `RopeScaling`. Raises `ValueError` for an unknown rule, a missing key, a key
    the rule does not use (most likely a typo), or a value of the wrong kind.
    """
    if scaling is None:
        return RopeScaling("default", {}, None, None)
    if not isinstance(scaling, Mapping):
        raise ValueError(
            f"scaling must be a dict such as config.json's rope_scaling, got "
            f"{type(scaling).__name__}."
        )
    names = {scaling[key] for key in _TYPE_KEYS if key in scaling}
    if len(names) > 1:
        raise ValueError(
            f"scaling names two rules: type={scaling['type']!r} and "
            f"rope_type={scaling['rope_type']!r}."
        )
    rope_type = names.pop() if names else "default"
    if rope_type not in _RULES:
        raise ValueError(
            f"Unknown RoPE scaling type {rope_type!r}; expected one of {ROPE_TYPES}."
        )
    rule = _RULES[rope_type]
    # A rule that reads a module key itself (proportional's partial_rotary_factor)
    # keeps it; the module does not see it.
    module_keys = _MODULE_KEYS - rule.optional
    parameters = {
        key: value
        for key, value in scaling.items()
        if key not in _TYPE_KEYS | module_keys
    }
    missing = rule.required - parameters.keys()
    if missing:
        raise ValueError(
            f"scaling for rope_type {rope_type!r} is missing {sorted(missing)} "
            f"(required: {sorted(rule.required)}). Where transformers reads a value "
            "from the model config instead (original_max_position_embeddings is the "
            "config's max_position_embeddings for 'dynamic'), put it in the dict."
        )
    unknown = parameters.keys() - rule.required - rule.optional
    if unknown:
        raise ValueError(
            f"scaling for rope_type {rope_type!r} has keys it does not use: "
            f"{sorted(unknown)}; accepted: "
            f"{sorted(rule.required | rule.optional | _TYPE_KEYS | _MODULE_KEYS)}."
        )
    rope_theta = scaling.get("rope_theta")
    partial_rotary_factor = (
        scaling.get("partial_rotary_factor")
        if "partial_rotary_factor" in module_keys
        else None
    )
    for key, value in (
        ("rope_theta", rope_theta),
        ("partial_rotary_factor", partial_rotary_factor),
    ):
        if value is not None:
            check_positive(f"scaling[{key!r}]", value)
    return RopeScaling(
        rope_type,
        parameters,
        None if rope_theta is None else float(rope_theta),
        None if partial_rotary_factor is None else float(partial_rotary_factor),
    )


def inverse_frequencies(
    scaling: RopeScaling, *, rotary_dim: int, theta: float, max_seq_len: int
) -> RopeTables:
    """The rule's inverse frequencies (float64, `(rotary_dim // 2,)`) and attention
    factor, as transformers computes them for a sequence of length `max_seq_len`."""
    return _RULES[scaling.rope_type].compute(
        scaling.parameters,
        rotary_dim=rotary_dim,
        theta=theta,
        max_seq_len=max_seq_len,
    )
