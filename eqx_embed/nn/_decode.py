import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import (
    Array,
    ArrayLike,
    Bool,
    DTypeLike,
    Float,
    Integer,
    PRNGKeyArray,
)

from ._contracts import check_feature_size, check_positive, checked
from ._cross_entropy import fused_cross_entropy, fused_log_sum_exp
from ._embedding import Embedding
from ._indices import IntegerSequence, check_indices
from ._numerics import dot_with_rows


class EmbeddingDecode(eqx.Module):
    """Maps hidden states back to vocabulary logits with an embedding's own table.

    It holds the `Embedding` itself, so its table is the very same leaf as the
    lookup's: build it from the stored embedding where you need it (in `__call__`, or
    through [`ReversibleEmbedding`][eqx_embed.ReversibleEmbedding]), and do not store
    it next to that embedding in a model, or the table becomes two leaves that
    training pulls apart (the weight tying guide explains the trap).
    """

    embedding: Embedding
    logit_soft_cap: float | None = eqx.field(static=True)
    dtype: jnp.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        embedding: Embedding,
        *,
        logit_soft_cap: float | None = None,
        dtype: DTypeLike | None = None,
    ):
        """**Arguments:**

        - `embedding`: the [`Embedding`][eqx_embed.Embedding] whose table to use.
        - `logit_soft_cap`: if given, logits become `cap * tanh(logits / cap)`, as
            keras_hub's `ReversibleEmbedding` (Gemma 2's final soft cap). Positive.
        - `dtype`: the compute dtype of the projection (keras' `reverse_dtype`).
            `None` uses the promoted dtype of the hidden state and the table.
            Low-precision products accumulate in float32.
        """
        if logit_soft_cap is not None:
            check_positive("logit_soft_cap", logit_soft_cap)
        self.embedding = embedding
        self.logit_soft_cap = None if logit_soft_cap is None else float(logit_soft_cap)
        self.dtype = None if dtype is None else jnp.dtype(dtype)

    @property
    def weight(self) -> Float[Array, "num_embeddings embedding_size"]:
        """The table, the same array as `self.embedding.weight`."""
        return self.embedding.weight

    @jax.named_scope("eqx_embed.EmbeddingDecode")
    @checked
    def __call__(
        self,
        hidden: Float[Array, " embedding_size"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " num_embeddings"]:
        """**Arguments:**

        - `hidden`: one hidden state of width `embedding_size`. Use `jax.vmap` for
            many.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The logits over the vocabulary, shape `(num_embeddings,)`, in the compute
        dtype, soft-capped if `logit_soft_cap` is set.
        """
        check_feature_size(
            hidden,
            self.embedding.embedding_size,
            name="hidden",
            owner="table's embedding_size",
        )
        return dot_with_rows(
            self.weight, hidden, dtype=self.dtype, soft_cap=self.logit_soft_cap
        )

    def _check_hidden_block(self, hidden: Array) -> None:
        check_feature_size(
            hidden,
            self.embedding.embedding_size,
            name="hidden",
            owner="table's embedding_size",
        )

    @jax.named_scope("eqx_embed.EmbeddingDecode.cross_entropy")
    @checked
    def cross_entropy(
        self,
        hidden: Float[Array, "tokens embedding_size"],
        targets: Integer[ArrayLike, " tokens"] | IntegerSequence,
        *,
        where: Bool[ArrayLike, " tokens"] | None = None,
        z_loss: float = 0.0,
        block_size: int | None = None,
    ) -> Float[Array, " tokens"]:
        """The softmax cross-entropy of the decoded logits against `targets`, per
        token, without ever materialising the `(tokens, num_embeddings)` logits: the
        vocabulary is walked in blocks, in the forward and the backward pass (a custom
        VJP), so that a large vocabulary costs memory of order
        `tokens * block_size` rather than `tokens * num_embeddings`.

        It equals `logsumexp(logits) - logits[target] + z_loss * logsumexp(logits)**2`
        with `logits = jax.vmap(self)(hidden)`, with this module's soft cap and
        compute dtype (low-precision products accumulate in float32, and the loss
        stays in float32). Gradients flow to `hidden` and to the table.

        Unlike `__call__`, this takes all the tokens at once, since fusing needs the
        token axis. Under `jax.vmap` over further batch axes (one call per
        sequence, say) the backward pass folds the batch into the token axis, so
        it still makes one table gradient, not one per example.

        **Arguments:**

        - `hidden`: the hidden states, shape `(tokens, embedding_size)`.
        - `targets`: the target token ids, shape `(tokens,)`. An id outside
            `[0, num_embeddings)` (negative ids are not counted from the end, so
            `-100` is out of range) follows the embedding's `out_of_range` policy:
            a NaN loss for that token with `"nan"`, an error with `"error"`.
        - `where`: optional, shape `(tokens,)`: where `False`, the loss is zero and
            the token gets no gradient. Its target is ignored, even out of range:
            it gives neither a NaN nor an error.
        - `z_loss`: the weight of PaLM's auxiliary `logsumexp(logits)**2` term.
            Non-negative.
        - `block_size`: the number of vocabulary rows per block. Positive; one
            larger than the vocabulary means one block. Defaults to 2048, the
            fastest on CPU in `benchmarks/bench_fused_loss.py`; the temporaries
            grow with `tokens * block_size` (144 MiB at 8,192 tokens, width 2,048
            and a float32 128k vocabulary, where the plain loss needs 8 GiB).

        **Returns:**

        The per-token losses, shape `(tokens,)`, float32 (float64 for a float64
        compute dtype). Reduce them as you like: `losses.sum() / where.sum()`.
        """
        self._check_hidden_block(hidden)
        if not z_loss >= 0:
            raise ValueError(f"z_loss must be non-negative, got {z_loss}.")
        if where is not None:
            where = jnp.asarray(where)
        # Masked-out targets are never looked up, so they may be anything.
        targets = check_indices(
            targets,
            size=self.embedding.num_embeddings,
            out_of_range=self.embedding.out_of_range,
            name="target",
            negative_from_end=False,
            where=where,
        )
        return fused_cross_entropy(
            self.weight,
            hidden,
            targets,
            where=where,
            z_loss=z_loss,
            dtype=self.dtype,
            logit_soft_cap=self.logit_soft_cap,
            block_size=block_size,
        )

    @jax.named_scope("eqx_embed.EmbeddingDecode.log_sum_exp")
    @checked
    def log_sum_exp(
        self,
        hidden: Float[Array, "tokens embedding_size"],
        *,
        block_size: int | None = None,
    ) -> Float[Array, " tokens"]:
        """`logsumexp(jax.vmap(self)(hidden), axis=-1)`, the log of the softmax's
        normaliser per token, computed blockwise as in
        [`cross_entropy`][eqx_embed.EmbeddingDecode.cross_entropy] (no
        `(tokens, num_embeddings)` array, differentiable).

        **Arguments:**

        - `hidden`: the hidden states, shape `(tokens, embedding_size)`.
        - `block_size`: as for `cross_entropy`.

        **Returns:**

        Shape `(tokens,)`, float32 (float64 for a float64 compute dtype).
        """
        self._check_hidden_block(hidden)
        return fused_log_sum_exp(
            self.weight,
            hidden,
            dtype=self.dtype,
            logit_soft_cap=self.logit_soft_cap,
            block_size=block_size,
        )
