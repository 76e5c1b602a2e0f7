"""The static description of a decoder-only transformer: `TransformerConfig`, whose
fields hold resolved values (the family's presets applied, then validated); the
presets live in `families/`."""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

from ..nn._contracts import MAX_TABLE_BYTES, check_positive, checked
from ..nn._indices import OutOfRange, check_policy
from ..nn._numerics import check_soft_cap
from ..nn._tables import FrozenMapping
from ._remat import RematPolicy, check_remat_policy
from .families import FamilySpec, NormKind, PositionKind, Presets, family_spec

Family = Literal[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt_neox",
    "gpt2",
]
"""The architectures `TransformerLM` implements, by their Hugging Face `model_type`
(the keys of `FAMILY_SPECS`, in its order, as a test checks)."""

FAMILIES: tuple[str, ...] = get_args(Family)
"""The families `TransformerConfig` accepts, by their Hugging Face `model_type`."""

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
"""The MLP activations understood, by their Hugging Face `hidden_act` names."""

LAYER_TYPES = ("full_attention", "sliding_attention")

NORMS: tuple[NormKind, ...] = get_args(NormKind)
POSITION_KINDS: tuple[PositionKind, ...] = get_args(PositionKind)

# The fields a family presets when they are left None.
_PRESET_FIELDS = tuple(field.name for field in dataclasses.fields(Presets))
_BOOLEAN_FIELDS = (
    "tie_word_embeddings",
    "gated_mlp",
    "scale_embeddings",
    "sandwich_norms",
    "parallel_residual",
    "attention_bias",
    "attention_output_bias",
    "mlp_bias",
    "qk_norm",
)
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
    "scan_unroll",
)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def floating_dtype(name: str, value: Any) -> jnp.dtype:
    """The dtype `value` names, which must be a floating one; `name` is the argument
    the error names."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if (
        not isinstance(value, str)
        or dtype is None
        or not jnp.issubdtype(dtype, jnp.floating)
    ):
        raise ValueError(
            f"{name} must name a floating dtype, such as 'float32' or 'bfloat16', "
            f"got {value!r}."
        )
    return dtype


def _resolved(arguments: dict[str, Any]) -> dict[str, Any]:
    """The fields of a `TransformerConfig` from its constructor's `arguments`: what
    was left `None` filled in (the family's presets, the derived sizes) and the
    containers frozen, so that the stored config is explicit. A `head_dim` that
    cannot be derived stays `None`, for the validation to name the sizes."""
    resolved = dict(arguments)
    presets = family_spec(arguments["family"]).presets
    for name in _PRESET_FIELDS:
        if arguments[name] is None:
            resolved[name] = getattr(presets, name)
    hidden_size, num_heads = arguments["hidden_size"], arguments["num_heads"]
    if arguments["num_kv_heads"] is None:
        resolved["num_kv_heads"] = num_heads
    if (
        arguments["head_dim"] is None
        and _is_positive_int(hidden_size)
        and _is_positive_int(num_heads)
        and hidden_size % num_heads == 0
    ):
        resolved["head_dim"] = hidden_size // num_heads
    if isinstance(arguments["rope_scaling"], Mapping):
        resolved["rope_scaling"] = FrozenMapping(arguments["rope_scaling"])
    if arguments["layer_types"] is not None:
        if isinstance(arguments["layer_types"], str):
            # `tuple` would list its characters.
            raise ValueError(
                "layer_types must be a sequence of layer types, one per layer, got "
                f"the string {arguments['layer_types']!r}; pass "
                f"[{arguments['layer_types']!r}] * num_layers for every layer."
            )
        resolved["layer_types"] = tuple(arguments["layer_types"])
    return resolved


@dataclasses.dataclass(frozen=True, init=False)
class TransformerConfig:
    """Everything about a [`TransformerLM`][eqx_embed.TransformerLM] that is not a
    weight: a frozen, hashable dataclass (the model keeps it as a static field), with
    plain JSON-able values (`to_dict` / `from_dict`).

    **Fields:**

    - `family`: `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`, `"gemma"`,
        `"gemma2"`, `"gemma3_text"`, `"gpt_neox"` or `"gpt2"` (Hugging Face's
        `model_type`). A preset: it gives the structure flags below their family's
        values (RMSNorm, Gemma's with `1 + scale`, or LayerNorm with bias for
        GPT-NeoX and GPT-2; a gated MLP, GeGLU / SwiGLU, or a plain one for GPT-NeoX
        and GPT-2; Gemma's embeddings scaled by `sqrt(hidden_size)`; Gemma 2's and 3's
        norms on the attention and MLP outputs; Qwen3's and Gemma 3's query/key
        norms; GPT-2's learned positions), and names the Hugging Face
        architecture the model loads from and saves to.
    - `vocab_size`, `hidden_size`, `intermediate_size` (the MLP's width),
        `num_layers`, `num_heads`: positive integers.
    - `num_kv_heads`: key/value heads for grouped-query attention, dividing
        `num_heads`. `None`: `num_heads`.
    - `head_dim`: `None`: `hidden_size // num_heads`.
    - `max_position_embeddings`: the longest sequence and largest position the model
        takes (the size of its RoPE tables, which are built in float64 and may take
        at most 4 GiB).
    - `rope_theta`, `rope_scaling`: the RoPE base and Hugging Face's scaling dict
        (`rope_type` `"linear"`, `"llama3"`, `"yarn"`, ...), as
        [`RotaryPositionalEmbedding`][eqx_embed.RotaryPositionalEmbedding] takes them.
    - `partial_rotary_factor`: the fraction of each head rotated (GPT-NeoX's
        `rotary_pct`).
    - `tie_word_embeddings`: whether the decode uses the embedding table.
    - `activation_dtype`, `param_dtype`: dtype names (`"float32"`, `"bfloat16"`, ...)
        of the activations and of the weights. Low-precision matmuls accumulate in
        float32; norms, softmax and soft caps run in float32.
    - `norm_eps`: the epsilon of every norm.
    - `hidden_act`: the MLP activation, a Hugging Face `hidden_act` name: `"silu"`,
        `"gelu"` (exact), `"gelu_pytorch_tanh"` / `"gelu_new"` (tanh approximation) or
        `"relu"`.
    - `attention_bias`: biases on the query, key and value projections (Qwen2).
    - `attention_output_bias`: a bias on the attention output projection.
    - `mlp_bias`: biases in the MLP.
    - `sliding_window`: the number of most recent tokens (the current one included)
        that a sliding-window layer attends to.
    - `layer_types`: per layer, `"full_attention"` or `"sliding_attention"`. `None`:
        every layer slides if `sliding_window` is set (Mistral), except for Gemma 2,
        whose even-numbered layers slide and odd-numbered ones attend fully, and
        Gemma 3, whose every sixth layer attends fully.
    - `attention_logit_soft_cap`, `final_logit_soft_cap`: Gemma 2's `tanh` caps on the
        attention scores and on the output logits. `None`: no cap.
    - `query_pre_attn_scalar`: attention scores are scaled by
        `query_pre_attn_scalar ** -0.5`. `None`: `head_dim` (the usual scaling).
    - `parallel_residual`: GPT-NeoX's `x + attention(norm(x)) + mlp(norm'(x))`
        instead of two residual steps in sequence.
    - `norm`: `"rms"` (RMSNorm), `"rms_unit_offset"` (Gemma's RMSNorm, scaled by
        `1 + weight`) or `"layer"` (LayerNorm with a bias).
    - `gated_mlp`: a gated MLP, `down(act(gate(x)) * up(x))` (SwiGLU / GeGLU),
        rather than `down(act(up(x)))`.
    - `scale_embeddings`: the embeddings scaled by `sqrt(hidden_size)` (Gemma).
    - `sandwich_norms`: norms on the attention and MLP outputs too (Gemma 2).
    - `qk_norm`: a norm (the model's kind, over `head_dim`) on each query and key
        head, before the rotation (Qwen3, Gemma 3).
    - `position_embedding`: `"rope"` (rotary positions in every layer) or
        `"learned"` (a [`PositionEmbedding`][eqx_embed.PositionEmbedding] of
        `max_position_embeddings` rows added to the token embeddings, GPT-2; the
        RoPE fields are then unused).
    - `rope_local_theta`: Gemma 3's second RoPE: the sliding-window layers rotate
        with this base and no scaling, the full-attention layers with `rope_theta`
        and `rope_scaling`. `None`: every layer uses `rope_theta`.
    - `out_of_range`: the policy for token ids outside the vocabulary and positions
        outside the RoPE tables: `"nan"` or `"error"`, as for
        [`Embedding`][eqx_embed.Embedding].
    - `scan_unroll`: how many layers each iteration of the scan over layers runs.
        `1` (the default) keeps compile time independent of depth; unrolling a
        shallow model saves the loop's per-layer copies on CPU (about 8% of a
        training step of the 2-layer model in `examples/train_tiny_lm.py`).
        It does not change the results.
    - `remat_policy`: what a training step recomputes in its backward pass rather
        than keep: `"none"`, `"layer"` or `"matmuls"` (see the scaling-out guide).

    The `None` defaults of `norm`, `gated_mlp`, `scale_embeddings`,
    `sandwich_norms`, `qk_norm`, `position_embedding`, `parallel_residual`,
    `norm_eps`, `hidden_act`, the biases and `partial_rotary_factor` take the
    family's value; the stored config holds the resolved value. Any combination of
    them builds a model; only the family's own combinations can be saved as a
    Hugging Face checkpoint of that family.

    **Raises:**

    - `ValueError`, naming the field: an unknown `family` or `hidden_act`, a size that
        is not positive or not finite, `num_kv_heads` not dividing `num_heads`, RoPE
        tables too large to build, an unknown `out_of_range`; unknown keys in
        `from_dict`.

    **Example:**

    ```python
    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    assert config.head_dim == 16 and config.norm_eps is not None  # resolved
    assert eqx_embed.TransformerConfig.from_dict(config.to_dict()) == config
    ```
    """

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float | int
    rope_scaling: FrozenMapping | None
    partial_rotary_factor: float | int
    tie_word_embeddings: bool
    activation_dtype: str
    param_dtype: str
    norm_eps: float | int
    hidden_act: str
    attention_bias: bool
    attention_output_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    layer_types: tuple[str, ...] | None
    attention_logit_soft_cap: float | int | None
    final_logit_soft_cap: float | int | None
    query_pre_attn_scalar: float | int | None
    parallel_residual: bool
    norm: NormKind
    gated_mlp: bool
    scale_embeddings: bool
    sandwich_norms: bool
    qk_norm: bool
    position_embedding: PositionKind
    rope_local_theta: float | int | None
    out_of_range: OutOfRange
    scan_unroll: int
    remat_policy: RematPolicy

    def __init__(
        self,
        family: Family,
        vocab_size: int,
        hidden_size: int,
        intermediate_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float | int = 10_000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        partial_rotary_factor: float | int | None = None,
        tie_word_embeddings: bool = True,
        activation_dtype: str = "float32",
        param_dtype: str = "float32",
        norm_eps: float | int | None = None,
        hidden_act: str | None = None,
        attention_bias: bool | None = None,
        attention_output_bias: bool | None = None,
        mlp_bias: bool | None = None,
        sliding_window: int | None = None,
        layer_types: Sequence[str] | None = None,
        attention_logit_soft_cap: float | int | None = None,
        final_logit_soft_cap: float | int | None = None,
        query_pre_attn_scalar: float | int | None = None,
        parallel_residual: bool | None = None,
        norm: NormKind | None = None,
        gated_mlp: bool | None = None,
        scale_embeddings: bool | None = None,
        sandwich_norms: bool | None = None,
        qk_norm: bool | None = None,
        position_embedding: PositionKind | None = None,
        rope_local_theta: float | int | None = None,
        out_of_range: OutOfRange = "nan",
        scan_unroll: int = 1,
        remat_policy: RematPolicy = "none",
    ):
        """**Arguments:** the fields, by the same names. Those left `None` whose
        description above gives a default (the family's presets, `num_kv_heads`,
        `head_dim`) take it: the config holds resolved values only."""
        # The arguments, one per field, before anything else is defined here.
        arguments = dict(locals())
        del arguments["self"]
        for name, value in _resolved(arguments).items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        for name in _SIZE_FIELDS:
            check_positive(name, getattr(self, name), integer=True)
        if self.head_dim is None:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads}) when head_dim is not given."
            )
        check_positive("head_dim", self.head_dim, integer=True)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        for name in ("rope_theta", "norm_eps", "partial_rotary_factor"):
            check_positive(name, getattr(self, name))
        for name in (
            "attention_logit_soft_cap",
            "final_logit_soft_cap",
            "query_pre_attn_scalar",
        ):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
                if name.endswith("soft_cap"):
                    check_soft_cap(name, getattr(self, name))
        for name in _BOOLEAN_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{name} must be True or False, got {getattr(self, name)!r}."
                )
        if self.partial_rotary_factor > 1:
            raise ValueError(
                "partial_rotary_factor must be in (0, 1], got "
                f"{self.partial_rotary_factor!r}."
            )
        if self.position_embedding == "rope" and (
            self.rotary_dim % 2 or self.rotary_dim == 0
        ):
            raise ValueError(
                f"head_dim * partial_rotary_factor = {self.head_dim} * "
                f"{self.partial_rotary_factor} gives a rotary width of "
                f"{self.rotary_dim}, which must be even and positive."
            )
        # cos and sin, rotary_dim / 2 float64 values each, per position.
        table_bytes = self.max_position_embeddings * self.rotary_dim * 8
        if self.position_embedding == "rope" and table_bytes > MAX_TABLE_BYTES:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} with a "
                f"rotary width of {self.rotary_dim} needs RoPE tables of "
                f"{table_bytes / 2**30:.1f} GiB, built in float64; the limit is "
                f"{MAX_TABLE_BYTES // 2**30} GiB."
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Mapping):
            raise ValueError(
                "rope_scaling must be None or a dict such as Hugging Face's "
                f"rope_scaling, got {self.rope_scaling!r}."
            )
        floating_dtype("activation_dtype", self.activation_dtype)
        floating_dtype("param_dtype", self.param_dtype)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {tuple(ACTIVATIONS)}, got "
                f"{self.hidden_act!r}."
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        if self.position_embedding not in POSITION_KINDS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_KINDS}, got "
                f"{self.position_embedding!r}."
            )
        if self.rope_local_theta is not None:
            check_positive("rope_local_theta", self.rope_local_theta)
            if self.position_embedding != "rope":
                raise ValueError(
                    "rope_local_theta needs position_embedding='rope', got "
                    f"{self.position_embedding!r}."
                )
        if self.sliding_window is not None:
            check_positive("sliding_window", self.sliding_window, integer=True)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(
                self.layer_types
            ) <= set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types must list {self.num_layers} (num_layers) values, "
                    f"each one of {LAYER_TYPES}; got {self.layer_types!r}."
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(
                    "layer_types has sliding_attention layers but sliding_window is "
                    "None."
                )
        check_policy(self.out_of_range)
        check_remat_policy(self.remat_policy)

    @property
    def spec(self) -> FamilySpec:
        """The family's architecture spec: its presets (the
        [Hugging Face guide](../guides/huggingface.md#adding-a-family) lists what a
        spec holds)."""
        return family_spec(self.family)

    @property
    def rotary_dim(self) -> int:
        """The number of dimensions of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, its sliding window, or `None` for full attention."""
        if self.layer_types is not None:
            types = self.layer_types
        elif self.sliding_window is None:
            types = ("full_attention",) * self.num_layers
        elif self.spec.full_attention_every is not None:
            every = self.spec.full_attention_every
            types = tuple(
                LAYER_TYPES[(i + 1) % every != 0] for i in range(self.num_layers)
            )
        else:
            types = ("sliding_attention",) * self.num_layers
        return tuple(
            self.sliding_window if kind == "sliding_attention" else None
            for kind in types
        )

    @checked
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict, which `from_dict` turns back into it."""
        values = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            values["rope_scaling"] = self.rope_scaling.to_dict()
        if self.layer_types is not None:
            values["layer_types"] = list(self.layer_types)
        return values

    @classmethod
    @checked
    def from_dict(cls, values: Mapping[str, Any]) -> "TransformerConfig":
        """The inverse of `to_dict`. Unknown keys raise a `ValueError` naming them."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(
                f"Unknown TransformerConfig keys {sorted(unknown)}; accepted: "
                f"{sorted(names)}."
            )
        return cls(**values)
