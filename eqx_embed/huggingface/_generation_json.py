"""A checkpoint's `generation_config.json` to and from the model's `GenerationConfig`
(the defaults of `TransformerLM.generate`), with transformers' defaults where the file
is silent."""

import os
import pathlib
import warnings
from typing import Any

from ..models._generate_checks import check_generation_config
from ..models._generation_config import GenerationConfig
from ._safetensors import GENERATION_CONFIG_NAME, read_json, write_json

# transformers' values when `do_sample` is true and the file is silent
# (`GenerationConfig._get_default_generation_params`, 5.25).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}

# Keys that change transformers' generation and that `generate` does not take from the
# file, at the values that change nothing.
_NEUTRAL = {
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
}


def read_generation_config(
    path: str | pathlib.Path, vocab_size: int
) -> GenerationConfig:
    """The defaults in the checkpoint directory's `generation_config.json` (none
    without one). A value that `generate` would refuse, and a key that would change
    transformers' output but is not read, are named in a warning and left unset."""
    file = pathlib.Path(path) / GENERATION_CONFIG_NAME
    if not os.path.lexists(file):
        return GenerationConfig()
    values = read_json(file)
    if not isinstance(values, dict):
        raise ValueError(f"{file} holds a JSON {type(values).__name__}, not an object.")
    unread = sorted(
        key for key, neutral in _NEUTRAL.items() if values.get(key, neutral) != neutral
    )
    if unread:
        warnings.warn(
            f"{file}: generate does not take {unread} from the file (pass those it "
            "has as arguments).",
            stacklevel=4,
        )
    sampling = values.get("do_sample", False)
    if not isinstance(sampling, bool):
        raise ValueError(f"{file}: do_sample must be true or false, got {sampling!r}.")
    sampled = dict.fromkeys(_SAMPLING_DEFAULTS)
    if sampling:
        sampled = {
            key: default if values.get(key) is None else values[key]
            for key, default in _SAMPLING_DEFAULTS.items()
        }
        # transformers: top_k 0 is off, and a top_k past the vocabulary keeps it all.
        top_k = sampled["top_k"]
        if isinstance(top_k, int) and top_k > vocab_size:
            sampled["top_k"] = vocab_size
        elif top_k == 0:
            sampled["top_k"] = None
    eos = values.get("eos_token_id")
    fields = dict(
        max_new_tokens=values.get("max_new_tokens"),
        repetition_penalty=values.get("repetition_penalty"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=values.get("pad_token_id"),
        **sampled,
    )
    return GenerationConfig(**_valid(fields, vocab_size, file))


def _valid(
    fields: dict[str, Any], vocab_size: int, file: pathlib.Path
) -> dict[str, Any]:
    """The fields that `generate` accepts, each checked alone (the filters with the
    temperature); the others are named in a warning and left unset, as transformers
    warns of them and runs on."""
    valid = {}
    for name, value in fields.items():
        if value is None:
            continue
        alone = {name: value}
        if name in ("top_k", "top_p"):
            alone["temperature"] = fields["temperature"]
        try:
            check_generation_config(GenerationConfig(**alone), vocab_size)
        except (TypeError, ValueError) as error:
            warnings.warn(
                f"{file}: {name}={value!r} is not used as a default of generate: "
                f"{error}",
                stacklevel=5,
            )
            continue
        valid[name] = value
    return valid


def write_generation_config(
    path: str | pathlib.Path, defaults: GenerationConfig
) -> None:
    """Writes `defaults` as the directory's `generation_config.json`, in the keys
    that transformers reads back to the same generation: an empty object when no
    default is set, so that an older file never outlives its checkpoint."""
    values: dict[str, Any] = {}
    if defaults.temperature is not None:
        values["do_sample"] = defaults.temperature > 0
        if defaults.temperature > 0:
            values["temperature"] = defaults.temperature
            # transformers would otherwise apply its top_k of 50.
            values["top_k"] = defaults.top_k or 0
            values["top_p"] = 1.0 if defaults.top_p is None else defaults.top_p
    for key in ("max_new_tokens", "repetition_penalty", "pad_token_id"):
        if getattr(defaults, key) is not None:
            values[key] = getattr(defaults, key)
    eos = defaults.eos_token_id
    if eos is not None:
        values["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    write_json(pathlib.Path(path) / GENERATION_CONFIG_NAME, values)
