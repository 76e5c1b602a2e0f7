"""What a family's Hugging Face checkpoints are, as data: `HuggingFaceFamily`, and
the shared pieces that the family files (`llama.py`, `gemma2.py`, ...) build theirs
from: the weight names, the `config.json` keys being read (`ConfigKeys`) and the
translations several families share. Each file pairs with the architecture of the
same name in `eqx_embed.models.families`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ...models import TransformerConfig
from ...models._config import LAYER_TYPES
from ...models.families import Presets, family_spec
from ...nn._contracts import check_positive


@dataclasses.dataclass(frozen=True)
class WeightNames:
    """Where the model's weights live in the family's Hugging Face checkpoints.

    - `layer_prefix`: the prefix of layer `i`'s weights, a format string
        (`"model.layers.{}."`).
    - `layer`: the Hugging Face module of each of the block's submodules, by its path
        in `DecoderBlock` (`"attention.query_proj"` to `"self_attn.q_proj"`).
    - `top`: the same for the modules outside the blocks (`"final_norm"`, ...).
    - `fused_qkv`: the Hugging Face module that fuses the query, key and value
        projections in the files (`"query_key_value"` for GPT-NeoX, `"c_attn"` for
        GPT-2), or `None`; `layer` then names the split parts `query`, `key` and
        `value`, siblings of the fused module (`"attention.query"`).
    - `fused_qkv_per_head`: how the fused rows are laid out: per head, each head's
        query, key and value rows adjacent (GPT-NeoX), or all the queries, then all
        the keys, then all the values (GPT-2).
    - `transposed`: the Hugging Face modules (last name) whose weights the files
        store as `(in, out)` rather than `(out, in)`: `Conv1D`'s (GPT-2).
    - `base_model_prefix`: the prefix of every name but the head's in a checkpoint
        of the whole model (`"transformer."` for GPT-2), which files of the base
        model alone leave out (the `gpt2` checkpoints on the Hub); `None`: such
        files are not read.
    """

    layer_prefix: str
    layer: Mapping[str, str]
    top: Mapping[str, str]
    fused_qkv: str | None = None
    fused_qkv_per_head: bool = True
    transposed: frozenset[str] = frozenset()
    base_model_prefix: str | None = None


LLAMA_WEIGHT_NAMES = WeightNames(
    layer_prefix="model.layers.{}.",
    layer={
        "attention_norm": "input_layernorm",
        "attention.query_proj": "self_attn.q_proj",
        "attention.key_proj": "self_attn.k_proj",
        "attention.value_proj": "self_attn.v_proj",
        "attention.output_proj": "self_attn.o_proj",
        "mlp_norm": "post_attention_layernorm",
        "mlp.gate": "mlp.gate_proj",
        "mlp.up": "mlp.up_proj",
        "mlp.down": "mlp.down_proj",
    },
    top={
        "embedding.embedding": "model.embed_tokens",
        "embedding.reverse_embedding": "lm_head",
        "final_norm": "model.norm",
    },
)
"""The weight names of Llama and of the families that copied its modules."""


class ConfigKeys:
    """A `config.json` being read: each key is taken once (what is left at the end was
    not understood), and a key left out takes transformers' default for the family."""

    def __init__(self, values: Mapping[str, Any], family: "HuggingFaceFamily"):
        self.given: dict[str, Any] = dict(values)  # all of them, for others' keys
        self.values: dict[str, Any] = dict(values)  # those not taken yet
        self.family = family

    def take(self, key: str) -> Any:
        """The value of `key`, or transformers' default (`None` if it has none)."""
        if key in self.values:
            return self.values.pop(key)
        return self.family.huggingface_defaults.get(key)

    def require(self, key: str) -> Any:
        """The value of `key`, which must be there."""
        if key not in self.values:
            raise ValueError(
                f"config.json has no {key!r}, which {self.family.name} needs."
            )
        return self.values.pop(key)

    def take_bool(self, key: str, *, nullable: bool = False) -> bool | None:
        """`take`, for a key that must hold a JSON boolean: not `"false"`, a string
        that Python would count as true, and not `null` unless `nullable` (which
        transformers would count as false even where its default is true)."""
        given = key in self.values
        value = self.take(key)
        if value is None and (nullable or not given):
            return None
        if not isinstance(value, bool):
            raise ValueError(
                f"config.json has {key}={value!r}; it must be true or false."
            )
        return value

    def take_positive(self, key: str) -> float | int | None:
        """`take`, for a key that must hold a positive finite number."""
        value = self.take(key)
        if value is not None:
            check_positive(f"config.json's {key}", value)
        return value

    def expect_false(self, key: str, why: str) -> None:
        """Takes the boolean `key`, which must be absent, `null` (transformers' own
        default for some keys) or false."""
        if self.take_bool(key, nullable=True):
            raise ValueError(
                f"config.json has {key}=True, which this model does not implement "
                f"({why})."
            )


@dataclasses.dataclass(frozen=True)
class HuggingFaceFamily:
    """One model family's Hugging Face checkpoints, as data.

    - `name`: Hugging Face's `model_type`, and `TransformerConfig.family`: the
        architecture of the same name in `eqx_embed.models.families`.
    - `architecture`: the class named in `config.json`'s `architectures`.
    - `weight_names`: see `WeightNames`.
    - `huggingface_defaults`: transformers' defaults for the `config.json` keys a
        checkpoint may leave out, where they differ from the presets (or are not
        config fields at all, such as `use_sliding_window`).
    - `read_config`: the `TransformerConfig` settings from the family's own
        `config.json` keys, taken from a `ConfigKeys`. The keys every family shares
        (sizes, `tie_word_embeddings`, the dtype, the RoPE settings) are read by
        `_config_json.py`, not here.
    - `write_config`: the inverse: the family's own `config.json` keys of a
        `TransformerConfig` (the RoPE ones included).
    - `normalise_config`, `denormalise_config`: for a family whose `config.json`
        spells the shared keys its own way (GPT-2's `n_embd`, `n_layer`, ...): the
        dict with the shared names (`hidden_size`, ...), and back. `None`: the
        shared names are the family's.
    - `partial_rotary`: whether transformers' model of the family rotates a part of
        each head (`partial_rotary_factor`, GPT-NeoX's `rotary_pct`). The others
        store the key but rotate the whole head, so a checkpoint that sets it is
        refused, and a model with a partial rotation is not exported to them.
    - `local_rope`: whether the sliding layers have a RoPE of their own
        (`rope_local_theta`, Gemma 3), which `config.json` gives per layer type in
        `rope_parameters` (or as `rope_local_base_freq`).
    """

    name: str
    architecture: str
    weight_names: WeightNames
    huggingface_defaults: Mapping[str, Any]
    read_config: Callable[[ConfigKeys], dict[str, Any]]
    write_config: Callable[[TransformerConfig], dict[str, Any]]
    local_rope: bool = False
    partial_rotary: bool = False
    normalise_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    denormalise_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def presets(self) -> Presets:
        """The presets of the family's architecture."""
        return family_spec(self.name).presets


# The translations shared by several families.


def read_rms_attention(keys: ConfigKeys) -> dict[str, Any]:
    """The attention and norm keys of the RMSNorm families (all but GPT-NeoX)."""
    return dict(
        num_kv_heads=keys.take("num_key_value_heads"),
        head_dim=keys.take("head_dim"),
        norm_eps=keys.take_positive("rms_norm_eps"),
    )


def write_rms_attention(config: TransformerConfig) -> dict[str, Any]:
    """The inverse of `read_rms_attention`, with the RoPE keys."""
    return dict(
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rope_scaling=rope_scaling_dict(config),
        rms_norm_eps=config.norm_eps,
    )


def rope_scaling_dict(config: TransformerConfig) -> dict[str, Any] | None:
    """`rope_scaling` as `config.json` holds it."""
    return None if config.rope_scaling is None else config.rope_scaling.to_dict()


def read_attention_bias(keys: ConfigKeys) -> dict[str, Any]:
    """`attention_bias`: biases on all four attention projections, or none."""
    bias = keys.take_bool("attention_bias")
    return dict(attention_bias=bias, attention_output_bias=bias)


def read_activation(keys: ConfigKeys, used: str, ignored: str) -> str | None:
    """The MLP activation from the key transformers reads for the family (`used`);
    the other spelling (`ignored`), which transformers ignores, must not contradict
    it."""
    activation = keys.take(used)
    other = keys.take(ignored)
    if other is not None and other != (activation or keys.family.presets.hidden_act):
        raise ValueError(
            f"config.json has {used}={activation!r} and {ignored}={other!r}; "
            f"transformers uses {used} for {keys.family.name}, so they must agree."
        )
    return activation


def read_layer_types(
    keys: ConfigKeys, sliding_window: int | None
) -> tuple[str, ...] | None:
    """`layer_types`, which only matters with a sliding window, but which transformers
    validates in any case: a list of `num_hidden_layers` layer types."""
    given = keys.take("layer_types")
    if given is None:
        return None
    num_layers = keys.given.get("num_hidden_layers")
    if (
        not isinstance(given, list)
        or not all(isinstance(kind, str) and kind in LAYER_TYPES for kind in given)
        or (isinstance(num_layers, int) and len(given) != num_layers)
    ):
        raise ValueError(
            f"config.json's layer_types must be a list of {num_layers} "
            f"(num_hidden_layers) layer types, each one of {LAYER_TYPES}; got "
            f"{given!r}."
        )
    return None if sliding_window is None else tuple(given)


def layer_types(config: TransformerConfig) -> list[str]:
    """Per layer, `"full_attention"` or `"sliding_attention"`, as `config.json`
    spells them."""
    return [
        "full_attention" if window is None else "sliding_attention"
        for window in config.layer_windows
    ]
