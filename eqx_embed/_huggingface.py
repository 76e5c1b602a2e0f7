"""Hugging Face checkpoints: `config.json` to and from `TransformerConfig`, and the
`*.safetensors` weights to and from the model's arrays, by name, with NumPy alone.

Weights travel as a flat dict keyed by the model's attribute paths
(`"blocks.attention.query.weight"`), with the layers stacked along a leading axis as
`TransformerLM` keeps them; `_transformer.py` turns the dict into modules.
"""

import dataclasses
import json
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._config import FAMILIES, FAMILY_TRAITS, TransformerConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}

# Keys that do not change the logits: bookkeeping, special token ids, initialisation,
# caching, and dropout (this model has none; it changes training, never the logits).
_INERT_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "attention_dropout",
        "bos_token_id",
        "cache_implementation",
        "classifier_dropout",
        "dtype",
        "eos_token_id",
        "hidden_dropout",
        "initializer_range",
        "is_decoder",
        "model_type",
        "output_attentions",
        "output_hidden_states",
        "pad_token_id",
        "pretraining_tp",
        "return_dict",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)

# The RoPE rules whose tables do not depend on the sequence length in transformers.
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# transformers' own defaults, for keys a config.json may leave out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(
        max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=4096
    ),
    "qwen2": dict(
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        sliding_window=4096,
        use_sliding_window=False,
        max_window_layers=28,
    ),
    "gemma": dict(max_position_embeddings=8192, tie_word_embeddings=True, head_dim=256),
    "gemma2": dict(
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gpt_neox": dict(
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rotary_pct=0.25,
        use_parallel_residual=True,
        attention_bias=True,
    ),
}


class _Keys:
    """A config.json being read: each key is taken once; what is left at the end was
    not understood."""

    def __init__(self, values: Mapping[str, Any], family: str):
        self.values = dict(values)
        self.defaults = _HF_DEFAULTS[family]
        self.family = family

    def take(self, key: str, default: Any = None) -> Any:
        if key in self.values:
            return self.values.pop(key)
        return self.defaults.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.values:
            raise ValueError(f"config.json has no {key!r}, which {self.family} needs.")
        return self.values.pop(key)

    def expect(self, key: str, allowed: tuple, why: str) -> None:
        """Takes `key`, which must be absent or one of `allowed`."""
        value = self.values.pop(key, allowed[0])
        if value not in allowed:
            raise ValueError(
                f"config.json has {key}={value!r}, which this model does not "
                f"implement ({why}); supported: {allowed}."
            )

    def check_all_taken(self) -> None:
        unknown = sorted(set(self.values) - _INERT_KEYS)
        if unknown:
            raise ValueError(
                f"config.json has keys that this {self.family} model does not "
                f"implement and that may change its output: "
                + ", ".join(f"{key}={self.values[key]!r}" for key in unknown)
                + "."
            )


def _rope_settings(keys: _Keys, max_position_embeddings: int) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` and `partial_rotary_factor` from either layout:
    transformers 4's `rope_theta` + `rope_scaling` (GPT-NeoX: `rotary_emb_base`,
    `rotary_pct`) or transformers 5's `rope_parameters`."""
    parameters = dict(keys.take("rope_parameters") or keys.take("rope_scaling") or {})
    theta = parameters.pop("rope_theta", None)
    for key in ("rope_theta", "rotary_emb_base"):
        value = keys.take(key)
        theta = value if theta is None else theta
    partial = parameters.pop("partial_rotary_factor", None)
    for key in ("partial_rotary_factor", "rotary_pct"):
        value = keys.take(key)
        partial = value if partial is None else partial
    rope_type = parameters.pop("rope_type", parameters.pop("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"config.json has RoPE scaling rope_type={rope_type!r}, which this model "
            f"does not implement (in transformers, 'dynamic' and 'longrope' depend on "
            f"the sequence length); supported: {_ROPE_TYPES}."
        )
    scaling = None
    if rope_type != "default":
        scaling = {"rope_type": rope_type, **parameters}
        if rope_type in ("llama3", "yarn"):
            scaling.setdefault(
                "original_max_position_embeddings", max_position_embeddings
            )
        if rope_type == "yarn" and scaling.get("factor") is None:
            scaling["max_position_embeddings"] = max_position_embeddings
    elif parameters:
        raise ValueError(
            f"config.json's RoPE settings have keys {sorted(parameters)} but no "
            "scaling rule (rope_type) that uses them."
        )
    settings: dict[str, Any] = dict(rope_scaling=scaling)
    if theta is not None:
        settings["rope_theta"] = float(theta)
    if partial is not None:
        settings["partial_rotary_factor"] = float(partial)
    return settings


def _layer_types(
    keys: _Keys, family: str, num_layers: int, sliding_window: int | None
) -> tuple[str, ...] | None:
    """Per-layer attention types, as transformers derives them per family."""
    given = keys.take("layer_types")
    if family == "qwen2":
        first_sliding = keys.take("max_window_layers")
        if given is None and sliding_window is not None:
            given = [
                "sliding_attention" if i >= first_sliding else "full_attention"
                for i in range(num_layers)
            ]
    if sliding_window is None:
        return None
    return None if given is None else tuple(given)


def config_from_huggingface(
    values: Mapping[str, Any],
    *,
    param_dtype: str | None = None,
    activation_dtype: str | None = None,
    out_of_range: str = "nan",
) -> TransformerConfig:
    """The [`TransformerConfig`][eqx_embed.TransformerConfig] of a Hugging Face
    `config.json` (as a dict). Unsupported keys or values raise a `ValueError` naming
    them."""
    family = values.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"config.json has model_type={family!r}; supported: {FAMILIES}."
        )
    keys = _Keys(values, family)
    traits = FAMILY_TRAITS[family]
    if param_dtype is None:
        stored = values.get("dtype") or values.get("torch_dtype") or "float32"
        param_dtype = stored if stored in ("float32", "bfloat16", "float16") else None
        param_dtype = param_dtype or "float32"
    hidden_size = keys.require("hidden_size")
    num_heads = keys.require("num_attention_heads")
    max_position_embeddings = keys.take("max_position_embeddings")
    settings: dict[str, Any] = dict(
        family=family,
        vocab_size=keys.require("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=keys.require("intermediate_size"),
        num_layers=keys.require("num_hidden_layers"),
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=keys.take("tie_word_embeddings"),
        param_dtype=param_dtype,
        activation_dtype=activation_dtype or param_dtype,
        out_of_range=out_of_range,
        **_rope_settings(keys, max_position_embeddings),
    )
    if family == "gpt_neox":
        head_dim = keys.take("head_dim")
        if head_dim not in (None, hidden_size // num_heads):
            raise ValueError(
                f"config.json has head_dim={head_dim}, but GPT-NeoX's heads are "
                f"hidden_size // num_attention_heads = {hidden_size // num_heads} wide."
            )
        bias = keys.take("attention_bias")
        settings.update(
            norm_eps=keys.take("layer_norm_eps", traits.norm_eps),
            hidden_act=keys.take("hidden_act", traits.hidden_act),
            attention_bias=bias,
            attention_output_bias=bias,
            parallel_residual=keys.take("use_parallel_residual"),
        )
    else:
        settings.update(
            num_kv_heads=keys.take("num_key_value_heads"),
            head_dim=keys.take("head_dim"),
            norm_eps=keys.take("rms_norm_eps", traits.norm_eps),
        )
        settings.setdefault("partial_rotary_factor", 1.0)
    if family in ("llama", "gemma", "gemma2"):
        bias = keys.take("attention_bias", False)
        settings.update(attention_bias=bias, attention_output_bias=bias)
    if family == "llama":
        settings["mlp_bias"] = keys.take("mlp_bias", False)
    if family == "mistral":
        keys.expect("attention_bias", (False,), "Mistral has no attention biases")
    if family in ("gemma", "gemma2"):
        keys.expect("use_bidirectional_attention", (None, False), "attention is causal")
    if family == "qwen2":
        keys.expect("use_mrope", (False,), "multimodal RoPE")
    # The activation key transformers 5 reads, and the other one, which it ignores
    # and which must then not say something else.
    used, other = {
        "gemma2": ("hidden_activation", "hidden_act"),
        "gemma": ("hidden_act", "hidden_activation"),
    }.get(family, ("hidden_act", None))
    activation = keys.take(used, traits.hidden_act)
    if other is not None:
        ignored = keys.take(other)
        if ignored not in (None, activation):
            raise ValueError(
                f"config.json has {used}={activation!r} and {other}={ignored!r}; "
                f"transformers uses {used} for {family}, so they must agree."
            )
    settings["hidden_act"] = activation
    if family in ("mistral", "qwen2", "gemma2"):
        sliding_window = keys.take("sliding_window")
        if family == "qwen2" and not keys.take("use_sliding_window"):
            sliding_window = None
        if family == "gemma2":
            size = keys.take("sliding_window_size")
            if size not in (None, sliding_window):
                raise ValueError(
                    f"config.json has sliding_window={sliding_window} and "
                    f"sliding_window_size={size}, which disagree."
                )
        settings.update(
            sliding_window=sliding_window,
            layer_types=_layer_types(
                keys, family, settings["num_layers"], sliding_window
            ),
        )
    if family == "gemma2":
        settings.update(
            query_pre_attn_scalar=keys.take("query_pre_attn_scalar"),
            attention_logit_soft_cap=keys.take("attn_logit_softcapping"),
            final_logit_soft_cap=keys.take("final_logit_softcapping"),
        )
    keys.check_all_taken()
    return TransformerConfig(**settings)


def config_to_huggingface(config: TransformerConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` (as a dict) of `config`. Raises a `ValueError`
    naming the settings that the family's Hugging Face config cannot express."""
    family = config.family
    values: dict[str, Any] = dict(
        architectures=[_ARCHITECTURES[family]],
        model_type=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        dtype=config.param_dtype,
    )
    scaling = None if config.rope_scaling is None else config.rope_scaling.to_dict()
    if family == "gpt_neox":
        values.update(
            rotary_emb_base=config.rope_theta,
            rotary_pct=config.partial_rotary_factor,
            rope_scaling=scaling,
            layer_norm_eps=config.norm_eps,
            hidden_act=config.hidden_act,
            attention_bias=config.attention_bias,
            use_parallel_residual=config.parallel_residual,
        )
    else:
        values.update(
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            rope_theta=config.rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=config.norm_eps,
        )
        if config.partial_rotary_factor != 1.0:
            values["partial_rotary_factor"] = config.partial_rotary_factor
        activation_key = "hidden_activation" if family == "gemma2" else "hidden_act"
        values[activation_key] = config.hidden_act
    if family in ("llama", "gemma", "gemma2"):
        values["attention_bias"] = config.attention_bias
    if family == "llama":
        values["mlp_bias"] = config.mlp_bias
    windows = config.layer_windows
    layer_types = [
        "full_attention" if window is None else "sliding_attention"
        for window in windows
    ]
    if family in ("mistral", "qwen2", "gemma2"):
        values["sliding_window"] = config.sliding_window
    if family == "qwen2":
        sliding = [i for i, window in enumerate(windows) if window is not None]
        values.update(
            use_sliding_window=bool(sliding),
            max_window_layers=sliding[0] if sliding else config.num_layers,
            layer_types=layer_types,
        )
    if family == "gemma2":
        values.update(
            layer_types=layer_types,
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            attn_logit_softcapping=config.attention_logit_soft_cap,
            final_logit_softcapping=config.final_logit_soft_cap,
        )
    # What the family cannot express is what does not come back when read.
    reread = config_from_huggingface(
        values,
        param_dtype=config.param_dtype,
        activation_dtype=config.activation_dtype,
        out_of_range=config.out_of_range,
    )
    different = [
        f"{field.name}={getattr(config, field.name)!r}"
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(reread, field.name)
        and field.name not in ("layer_types", "query_pre_attn_scalar")
    ]
    if reread.layer_windows != windows or (
        (reread.query_pre_attn_scalar or reread.head_dim)
        != (config.query_pre_attn_scalar or config.head_dim)
    ):
        different.append("the per-layer attention (layer_types, sliding_window)")
    if different:
        raise ValueError(
            f"A Hugging Face {family} config cannot express these settings: "
            + ", ".join(different)
            + "."
        )
    return values


def _layer_names(config: TransformerConfig) -> tuple[str, dict[str, str]]:
    """The Hugging Face prefix of layer `i` (a format string) and the Hugging Face
    names of the block's submodules."""
    if config.family == "gpt_neox":
        return "gpt_neox.layers.{}.", {
            "attention_norm": "input_layernorm",
            "attention.output": "attention.dense",
            "mlp_norm": "post_attention_layernorm",
            "mlp.up": "mlp.dense_h_to_4h",
            "mlp.down": "mlp.dense_4h_to_h",
            # Fused into attention.query_key_value in the file; see _split_qkv.
            "attention.query": "attention.query",
            "attention.key": "attention.key",
            "attention.value": "attention.value",
        }
    names = {
        "attention_norm": "input_layernorm",
        "attention.query": "self_attn.q_proj",
        "attention.key": "self_attn.k_proj",
        "attention.value": "self_attn.v_proj",
        "attention.output": "self_attn.o_proj",
        "mlp_norm": "post_attention_layernorm",
        "mlp.gate": "mlp.gate_proj",
        "mlp.up": "mlp.up_proj",
        "mlp.down": "mlp.down_proj",
    }
    if config.traits.sandwich_norms:
        names.update(
            attention_output_norm="post_attention_layernorm",
            mlp_norm="pre_feedforward_layernorm",
            mlp_output_norm="post_feedforward_layernorm",
        )
    return "model.layers.{}.", names


def _top_names(config: TransformerConfig) -> dict[str, str]:
    if config.family == "gpt_neox":
        return {
            "embedding.embedding": "gpt_neox.embed_in",
            "embedding.reverse_embedding": "embed_out",
            "final_norm": "gpt_neox.final_layer_norm",
        }
    return {
        "embedding.embedding": "model.embed_tokens",
        "embedding.reverse_embedding": "lm_head",
        "final_norm": "model.norm",
    }


def _huggingface_name(name: str, config: TransformerConfig) -> str | list[str]:
    """The Hugging Face name of the model's weight `name`, or, for a stacked block
    weight, the list of per-layer names."""
    module, leaf = name.rsplit(".", 1)
    if module.startswith("blocks."):
        prefix, names = _layer_names(config)
        hf_module = names[module.removeprefix("blocks.")]
        return [
            f"{prefix.format(layer)}{hf_module}.{leaf}"
            for layer in range(config.num_layers)
        ]
    return f"{_top_names(config)[module]}.{leaf}"


def _split_qkv(tensors: dict[str, np.ndarray], config: TransformerConfig) -> None:
    """Replaces each of GPT-NeoX's fused `attention.query_key_value` weights and biases
    by separate query, key and value tensors, in place. The fused rows are laid out
    per head: `(heads, 3, head_dim)`, each head's query, key and value rows adjacent."""
    fused = (".query_key_value.weight", ".query_key_value.bias")
    for fused_name in [name for name in tensors if name.endswith(fused)]:
        array = tensors.pop(fused_name)
        per_head = array.reshape(config.num_heads, 3, -1, *array.shape[1:])
        prefix, leaf = fused_name.rsplit(".query_key_value.", 1)
        for index, part in enumerate(("query", "key", "value")):
            tensors[f"{prefix}.{part}.{leaf}"] = per_head[:, index].reshape(
                -1, *array.shape[1:]
            )


def _fuse_qkv(tensors: dict[str, np.ndarray], config: TransformerConfig) -> None:
    """The inverse of `_split_qkv`, in place."""
    for query_name in [n for n in tensors if ".attention.query." in n]:
        prefix, leaf = query_name.split(".attention.query.")
        parts = [
            tensors.pop(f"{prefix}.attention.{part}.{leaf}")
            for part in ("query", "key", "value")
        ]
        per_head = np.stack(
            [part.reshape(config.num_heads, -1, *part.shape[1:]) for part in parts],
            axis=1,
        )
        tensors[f"{prefix}.attention.query_key_value.{leaf}"] = per_head.reshape(
            -1, *parts[0].shape[1:]
        )


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as NumPy arrays. bfloat16, which
    safetensors' NumPy API cannot return, is read from the file's raw bytes (the
    format is a JSON header followed by the tensors, little-endian)."""
    from safetensors import safe_open

    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    header.pop("__metadata__", None)
    bfloat16 = {name for name, entry in header.items() if entry["dtype"] == "BF16"}
    tensors: dict[str, np.ndarray] = {}
    with safe_open(file, framework="numpy") as handle:
        for name in header.keys() - bfloat16:
            tensors[name] = handle.get_tensor(name)
    if bfloat16:
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_size)
        for name in bfloat16:
            start, end = header[name]["data_offsets"]
            tensors[name] = (
                np.frombuffer(data[start:end], dtype="<u2")
                .view(jnp.bfloat16)
                .reshape(header[name]["shape"])
            )
    return tensors


def _checkpoint_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files.")
    return files


# Buffers that old checkpoints saved and that transformers recomputes.
_RECOMPUTED_SUFFIXES = (
    ".rotary_emb.inv_freq",
    ".attention.bias",
    ".attention.masked_bias",
)


def read_config(
    path: str | pathlib.Path,
    *,
    param_dtype: str | None = None,
    activation_dtype: str | None = None,
    out_of_range: str = "nan",
) -> TransformerConfig:
    """The [`TransformerConfig`][eqx_embed.TransformerConfig] of the `config.json` in
    the checkpoint directory `path`."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path} has no config.json.")
    return config_from_huggingface(
        json.loads(config_file.read_text()),
        param_dtype=param_dtype,
        activation_dtype=activation_dtype,
        out_of_range=out_of_range,
    )


def read_weights(
    path: str | pathlib.Path, config: TransformerConfig, names: list[str]
) -> dict[str, np.ndarray]:
    """The weights of the checkpoint directory `path`, by the model's weight names.

    **Arguments:**

    - `path`: the directory, with `*.safetensors` files (sharded ones listed in
        `model.safetensors.index.json`).
    - `config`: the model's config, as `read_config` returns it.
    - `names`: the model's weight names (`"blocks.mlp.up.weight"`).

    **Returns:**

    A dict from each of `names` to a NumPy array, the layers of block weights stacked
    along a leading axis. A weight missing from the files, or one in the files that
    the model has no place for, raises a `ValueError` naming it.
    """
    directory = pathlib.Path(path)
    tensors: dict[str, np.ndarray] = {}
    for file in _checkpoint_files(directory):
        for name, array in _read_safetensors(file).items():
            if name in tensors:
                raise ValueError(f"{name} is stored twice in {directory}.")
            tensors[name] = array
    for name in [n for n in tensors if n.endswith(_RECOMPUTED_SUFFIXES)]:
        del tensors[name]
    if config.family == "gpt_neox":
        _split_qkv(tensors, config)
    arrays = {}
    for name in names:
        hf_name = _huggingface_name(name, config)
        hf_names = hf_name if isinstance(hf_name, list) else [hf_name]
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise ValueError(
                f"The checkpoint has no {missing[0]} (for the model's {name}), which "
                "its config implies."
            )
        layers = [tensors.pop(n) for n in hf_names]
        arrays[name] = np.stack(layers) if isinstance(hf_name, list) else layers[0]
    if config.tie_word_embeddings:
        # transformers ties the decode to the embedding and ignores a stored copy.
        tensors.pop(
            _huggingface_name("embedding.reverse_embedding.weight", config), None
        )
    if tensors:
        raise ValueError(
            "The checkpoint has weights that its config does not imply, which this "
            f"model would ignore: {sorted(tensors)}."
        )
    return arrays


def write_checkpoint(
    path: str | pathlib.Path,
    config: TransformerConfig,
    arrays: Mapping[str, Any],
) -> None:
    """Writes `config.json` and `model.safetensors` to the directory `path`.

    **Arguments:**

    - `path`: the directory, created if needed.
    - `config`: the model's config.
    - `arrays`: the model's weights by name, layers stacked, as `read_weights`
        returns them. bfloat16 weights are written as float32 (exactly; safetensors'
        NumPy API has no bfloat16), with `"dtype": "bfloat16"` in `config.json`.
    """
    from safetensors.numpy import save_file

    values = config_to_huggingface(config)
    tensors: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)
        hf_name = _huggingface_name(name, config)
        if isinstance(hf_name, list):
            tensors.update(zip(hf_name, array, strict=True))
        else:
            tensors[hf_name] = array
    if config.family == "gpt_neox":
        _fuse_qkv(tensors, config)
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(values, indent=2) + "\n")
