"""Hugging Face `config.json` to and from `TransformerConfig`."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..models._config import FAMILIES, FAMILY_TRAITS, TransformerConfig

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
