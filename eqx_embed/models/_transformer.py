"""`TransformerLM`: a decoder-only language model built from this library's modules.

```
tokens ─ embedding ─ (× sqrt(hidden_size), Gemma) ─┬─ block 0 ─ ... ─ block L-1 ─┬─
                                                   └── jax.lax.scan over layers ──┘
       ─ final_norm ─ decode (tied or untied, soft-capped) ─ logits
                     └ cross_entropy (fused, blockwise) ─ loss
```

The blocks are one `DecoderBlock` whose arrays have a leading layer axis; the forward
pass scans over it, so compiling a deep model costs what compiling one layer does.
What differs between layers (Gemma 2's alternating sliding window) is scanned data.
"""

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
from jaxtyping import (
    Array,
    ArrayLike,
    Bool,
    DTypeLike,
    Float,
    Int,
    Integer,
    PRNGKeyArray,
)

from ..nn._contracts import checked
from ..nn._indices import IntegerSequence, OutOfRange
from ..nn._position import PositionEmbedding
from ..nn._reversible import ReversibleEmbedding
from ..nn._rope import RotaryPositionalEmbedding
from ._blocks import DecoderBlock, Norm
from ._cache import KVCache, check_decode_tokens, decode_step
from ._config import TransformerConfig
from ._eager import compiled_when_eager
from ._generate import Generated, generate, prefill_prompts
from ._generation_config import GenerationConfig
from ._transformer_forward import hidden_states
from ._transformer_loss import batch_mean_loss, sequence_loss
from ._transformer_parts import check_parts, given_parts, make_rope


class TransformerLM(eqx.Module):
    """A decoder-only transformer language model: Llama (2, 3, 3.1), Mistral, Qwen2,
    Qwen3, Gemma, Gemma 2, Gemma 3 (text), GPT-NeoX or GPT-2, as set by its
    [`TransformerConfig`][eqx_embed.TransformerConfig].

    It holds the body (the [`ReversibleEmbedding`][eqx_embed.ReversibleEmbedding],
    which also decodes, tied or untied; the decoder blocks, stacked along a leading
    layer axis; the final norm) and the RoPE tables, which are integer arrays and so
    never trained by the plain Equinox recipe
    (`optax` on `eqx.filter(model, eqx.is_inexact_array)`).

    One sequence per call; batch with `jax.vmap`, compile with `eqx.filter_jit`.
    Inputs are checked before any computation: token dtype and range (the config's
    `out_of_range` policy, as for [`Embedding`][eqx_embed.Embedding]), positions
    against the RoPE tables, and the sequence length against
    `max_position_embeddings`.

    Called eagerly, the public methods compile themselves once per shape (and config),
    except under `out_of_range="error"`, where bad ids known at once raise at once.

    **Raises:**

    - `ValueError`: both or neither of `key` and the modules; modules that disagree with
        the config (the first mismatch named); a sequence longer than
        `max_position_embeddings`; an out-of-range token id or position under
        `out_of_range="error"`; from `from_huggingface`, a config key or value the model
        does not implement.
    - `jaxtyping.TypeCheckError`: a batch passed to a per-sequence call (use
        `jax.vmap`), float token ids, `targets` of another length than `tokens`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, max_position_embeddings=64,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    tokens = jnp.array([1, 2, 3, 4, 5])
    logits = model(tokens)
    loss = model.loss(tokens[:-1], tokens[1:]).mean()
    batch_logits = jax.vmap(model)(jnp.stack([tokens, tokens]))
    assert logits.shape == (5, 128) and batch_logits.shape == (2, 5, 128)
    ```
    """

    embedding: ReversibleEmbedding
    blocks: DecoderBlock
    final_norm: Norm
    position_embedding: PositionEmbedding | None
    rope: RotaryPositionalEmbedding | None
    local_rope: RotaryPositionalEmbedding | None
    config: TransformerConfig = eqx.field(static=True)
    generation_config: GenerationConfig = eqx.field(static=True)

    def __init__(
        self,
        config: TransformerConfig,
        *,
        key: PRNGKeyArray | None = None,
        embedding: ReversibleEmbedding | None = None,
        # Typed as any module, not as the private `DecoderBlock` and `Norm`: they come
        # from a built model, and `__check_init__` checks them against `config`.
        blocks: eqx.Module | None = None,
        final_norm: eqx.Module | None = None,
        position_embedding: PositionEmbedding | None = None,
        generation_config: GenerationConfig | None = None,
    ):
        """**Arguments:**

        - `config`: the [`TransformerConfig`][eqx_embed.TransformerConfig].

        Then either

        - `key`: a `jax.random.PRNGKey` to initialise every weight,

        or existing modules, which must agree with `config` in every shape, dtype and
        setting (a `ValueError` names the first that does not):

        - `embedding`: the [`ReversibleEmbedding`][eqx_embed.ReversibleEmbedding].
        - `blocks`: one `DecoderBlock` (as `model.blocks` of a built model) whose arrays
            have a leading axis of size `num_layers`.
        - `final_norm`: the norm before the decode.
        - `position_embedding`: the
            [`PositionEmbedding`][eqx_embed.PositionEmbedding] of a model with
            learned positions (GPT-2); `None` otherwise.
        - `generation_config`: the defaults of `generate` (none by default).
        """
        parts = given_parts(
            config,
            key,
            dict(embedding=embedding, blocks=blocks, final_norm=final_norm),
            position_embedding,
        )
        self.embedding = parts["embedding"]
        self.blocks = parts["blocks"]
        self.final_norm = parts["final_norm"]
        self.position_embedding = parts["position_embedding"]
        self.rope = make_rope(config)
        self.local_rope = make_rope(config, local=True)
        self.config = config
        self.generation_config = generation_config or GenerationConfig()

    def __check_init__(self) -> None:
        check_parts(self.config, self.parts())

    def parts(self) -> dict[str, Any]:
        """The modules that hold the weights, by the names `__init__` takes them
        under (the RoPE tables, which are not weights, left out)."""
        return dict(
            embedding=self.embedding,
            blocks=self.blocks,
            final_norm=self.final_norm,
            position_embedding=self.position_embedding,
        )

    @compiled_when_eager
    @jax.named_scope("eqx_embed.TransformerLM.hidden_states")
    @checked
    def hidden_states(
        self,
        tokens: Integer[ArrayLike, " seq"] | IntegerSequence,
        *,
        token_positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        segment_ids: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
    ) -> Float[Array, "seq hidden_size"]:
        """The hidden states after the final norm, before the decode.

        **Arguments:**

        - `tokens`: the token ids of one sequence, at most `max_position_embeddings`
            of them.
        - `token_positions`: the position of each token, in
            `[0, max_position_embeddings)`. Defaults to `0 .. seq-1`, or, with
            `segment_ids`, to `0, 1, ...` restarting at every change of segment. The
            causal mask and sliding windows go by index in the sequence, as in
            Hugging Face.
        - `segment_ids`: for packed sequences, an integer per token; a token attends
            only to the tokens since the last change of id (so documents packed one
            after another never see each other).

        **Returns:**

        Shape `(seq, hidden_size)`, in the activation dtype.
        """
        return hidden_states(self, tokens, token_positions, segment_ids)

    @compiled_when_eager
    @jax.named_scope("eqx_embed.TransformerLM")
    @checked
    def __call__(
        self,
        tokens: Integer[ArrayLike, " seq"] | IntegerSequence,
        *,
        token_positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        segment_ids: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq vocab_size"]:
        """The logits of the next token after each prefix of one sequence.

        **Arguments:**

        - `tokens`, `token_positions`, `segment_ids`: as for `hidden_states`.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        Shape `(seq, vocab_size)`, in the activation dtype (soft-capped for
        Gemma 2).
        """
        hidden = self.hidden_states(
            tokens, token_positions=token_positions, segment_ids=segment_ids
        )
        return jax.vmap(self.embedding.decode)(hidden)

    @compiled_when_eager
    @checked
    def loss(
        self,
        tokens: Integer[ArrayLike, " seq"] | IntegerSequence,
        targets: Integer[ArrayLike, " seq"] | IntegerSequence,
        *,
        where: Bool[ArrayLike, " seq"] | None = None,
        token_positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        segment_ids: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        z_loss: float = 0.0,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
    ) -> Float[Array, " seq"]:
        """Per-token training loss through the fused decode cross-entropy, which never
        holds the whole `(seq, vocab_size)` logits.

        **Arguments:**

        - `tokens`, `targets`: the input ids and the id expected after each prefix
            (usually `tokens` shifted by one).
        - `where`: which tokens count; the others get a loss of 0. The tokens
            after the last that counts are not read (a bad id there is harmless).
        - `token_positions`, `segment_ids`: as for `hidden_states`. A packed row's
            losses equal those of each document run alone.
        - `z_loss`, `label_smoothing`, `ignore_index`: the `log(Z)**2`
            regulariser's weight, torch's label smoothing and ignored target id, as
            for `EmbeddingDecode.cross_entropy`.

        **Returns:**

        The float32 cross-entropy of each token, shape `(seq,)`. Average it over
        `where` yourself.
        """
        positions = (token_positions, segment_ids)
        controls = (z_loss, label_smoothing, ignore_index)
        return sequence_loss(self, tokens, targets, where, positions, controls)

    @compiled_when_eager
    @checked
    def mean_loss(
        self,
        tokens: Integer[ArrayLike, "batch seq"],
        targets: Integer[ArrayLike, "batch seq"],
        *,
        where: Bool[ArrayLike, "batch seq"] | None = None,
        weights: Float[ArrayLike, "batch seq"] | None = None,
        token_positions: Int[ArrayLike, "batch seq"] | None = None,
        segment_ids: Int[ArrayLike, "batch seq"] | None = None,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
    ) -> Float[Array, ""]:
        """The training loss of a whole batch: the mean cross-entropy over every
        token of every sequence that `where` keeps, one scalar, through
        [`ReversibleEmbedding.mean_cross_entropy`][eqx_embed.ReversibleEmbedding.mean_cross_entropy]
        (gradients in the forward pass: three matmuls, no logits in memory).

        Unlike the other methods, this takes the batch (do not `jax.vmap` it): the
        batch's tokens are one reduction, so the mean is over tokens (not of
        per-sequence means) and there is one table gradient, not one per sequence.

        **Arguments:**

        - `tokens`, `targets`: as for `loss`, shape `(batch, seq)`.
        - `where`: which tokens count, shape `(batch, seq)`; the mean divides by
            their number (by 1 when there are none).
        - `weights`: optional per-token weights, shape `(batch, seq)`: the result
            is then `sum(weights * losses)`, without division.
        - `token_positions`, `segment_ids`: as for `hidden_states`, one row per
            sequence. A packed row's mean loss equals the token-weighted mean of
            each document's run alone.
        - `z_loss`, `label_smoothing`, `ignore_index`: as for `loss`.
        - `chunk_size`: tokens per chunk of the fused loss; see
            `EmbeddingDecode.mean_cross_entropy`.

        **Returns:**

        A float32 scalar: 0 (and no gradient) for a batch of no tokens.
        """
        per_token = (where, weights, token_positions, segment_ids)
        controls = (z_loss, label_smoothing, ignore_index)
        return batch_mean_loss(self, tokens, targets, per_token, controls, chunk_size)

    @compiled_when_eager
    @checked
    def score(
        self,
        tokens: Integer[ArrayLike, " seq"] | IntegerSequence,
        next_tokens: Integer[ArrayLike, " seq"] | IntegerSequence,
        *,
        token_positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        segment_ids: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
    ) -> Float[Array, " seq"]:
        """Log-probabilities of given continuations:
        `log p(next_tokens[i] | tokens[: i + 1])`.

        **Arguments:**

        - `tokens`: the token ids of one sequence.
        - `next_tokens`: the token to score after each prefix.
        - `token_positions`, `segment_ids`: as for `hidden_states`.

        **Returns:**

        float32 log-probabilities, shape `(seq,)`. Their negated mean over a text is
        the log of its perplexity.
        """
        return -self.loss(
            tokens,
            next_tokens,
            token_positions=token_positions,
            segment_ids=segment_ids,
        )

    def prefill(
        self,
        prompts: Integer[ArrayLike, "batch seq"],
        *,
        prompt_lengths: Integer[ArrayLike, " batch"] | None = None,
        capacity: int,
    ) -> tuple[Float[Array, "batch vocab_size"], KVCache]:
        """Runs a batch of prompts once and caches their keys and values.

        **Arguments:**

        - `prompts`: right-padded token ids; row `b`'s prompt is
            `prompts[b, :prompt_lengths[b]]`.
        - `prompt_lengths`: each prompt's length, in `[1, seq]`. Defaults to `seq`.
        - `capacity`: the most tokens (prompt included) a row will hold, at least
            `seq`, at most `max_position_embeddings`: the slots of each
            full-attention layer; a sliding-window layer keeps
            `min(capacity, sliding_window)`.

        **Returns:**

        The logits after each prompt's last token, and the
        [`KVCache`][eqx_embed.KVCache] to pass to `decode_step`.
        """
        return prefill_prompts(self, prompts, prompt_lengths, capacity)

    def decode_step(
        self, cache: KVCache, tokens: Integer[ArrayLike, " batch"]
    ) -> tuple[Float[Array, "batch vocab_size"], KVCache]:
        """Appends one token to every row of the cache, at position `cache.lengths`.

        **Arguments:**

        - `cache`: from `prefill` or a previous `decode_step` of a model of this
            config, with room left: a row holds at most `cache.capacity` tokens
            (checked when concrete; a traced row past it overwrites its oldest).
        - `tokens`: one token id per row.

        **Returns:**

        The logits after each new token (equal to the full forward's at that
        position) and the advanced cache.
        """
        return decode_step(self, cache, check_decode_tokens(self.config, cache, tokens))

    def generate(
        self,
        prompts: Integer[ArrayLike, "batch seq"],
        *,
        prompt_lengths: Integer[ArrayLike, " batch"] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | int | None = None,
        top_k: int | None = None,
        top_p: float | int | None = None,
        min_p: float | int | None = None,
        repetition_penalty: float | int | None = None,
        presence_penalty: float | int | None = None,
        frequency_penalty: float | int | None = None,
        min_new_tokens: int | None = None,
        stop_sequences: Sequence[Sequence[int]] | None = None,
        logits_processor: Callable | None = None,
        key: PRNGKeyArray | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        capacity: int | None = None,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float | int = 1.0,
        early_stopping: bool | str = False,
        return_scores: bool = False,
    ) -> Generated:
        """Continues a batch of prompts with a KV cache, in one compiled loop per
        shape that stops as soon as every row has ended (an EOS, a stop sequence).

        **Arguments** (those left `None` take the model's `generation_config`):

        - `prompts`, `prompt_lengths`: as for `prefill` (right-padded).
        - `max_new_tokens`: how many tokens to generate per row.
        - `temperature`: `0` (the default) for greedy decoding, else of sampling.
        - `top_k`, `top_p`, `min_p`, `repetition_penalty`, `presence_penalty`,
            `frequency_penalty`, `min_new_tokens`: transformers' and OpenAI's
            controls (the [generation guide](../guides/generation.md) defines each).
        - `stop_sequences`: token-id sequences; a row ends once it ends with one.
        - `logits_processor`: a pure `(logits, tokens, step) -> logits`, compiled
            into the loop; `tokens` are those generated, `pad_token_id` from `step`.
        - `key`: a `jax.random.PRNGKey`, required when sampling.
        - `eos_token_id`, `pad_token_id`: the id (or ids) that ends a row, and what
            follows its end (default: the first EOS id, or 0).
        - `capacity`: as for `prefill`; defaults to `seq + max_new_tokens`.
        - `num_beams`, `num_return_sequences`, `length_penalty`, `early_stopping`
            (`True`, `False` or `"never"`): beam search (greedy), as `transformers`.
        - `return_scores`: with beams, also return each sequence's score.

        **Returns:**

        The new tokens, shape `(batch * num_return_sequences, max_new_tokens)` (a
        prompt's sequences together, best first), and their scores if asked; `-1`
        from the step where a row's logits hold a NaN. Every argument is checked (a
        `ValueError` naming it) before anything is compiled.
        """
        arguments = dict(locals())  # every argument, forwarded by name
        return generate(arguments.pop("self"), **arguments)

    @classmethod
    @checked
    def from_huggingface(
        cls,
        path: str | pathlib.Path,
        *,
        param_dtype: DTypeLike | None = None,
        activation_dtype: DTypeLike | None = None,
        out_of_range: OutOfRange = "nan",
    ) -> "TransformerLM":
        """Loads a Hugging Face checkpoint directory, with NumPy and `safetensors`
        alone (no PyTorch).

        **Arguments:**

        - `path`: a directory with `config.json`, `model.safetensors` (or shards in
            `model.safetensors.index.json`) and any `generation_config.json`.
        - `param_dtype`: the dtype of the weights. Defaults to the checkpoint's
            `dtype` / `torch_dtype`, or float32.
        - `activation_dtype`: defaults to `param_dtype`.
        - `out_of_range`: the policy for bad token ids and positions, `"nan"` or
            `"error"`.

        **Returns:**

        The model. A config key or value that the model does not implement and that
        would change its output raises a `ValueError` naming it.
        """
        from ..huggingface import load_transformer

        return load_transformer(
            path,
            param_dtype=param_dtype,
            activation_dtype=activation_dtype,
            out_of_range=out_of_range,
        )

    @checked
    def to_huggingface(self, path: str | pathlib.Path) -> None:
        """Writes a Hugging Face checkpoint directory (`config.json`, the weights,
        and `generation_config.json`, the defaults of `generate`) that
        `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits
        (quantized weights: written dequantized).

        **Arguments:**

        - `path`: the directory, created if needed. A checkpoint already there
            (`model.safetensors`, or a sharded one's index and shards) is replaced;
            other files stay. Each file is written to a temporary name and renamed,
            `config.json` last.
        """
        from ..huggingface import save_transformer

        save_transformer(self, path)
