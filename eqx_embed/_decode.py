import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float, PRNGKeyArray

from ._contracts import check_feature_size, checked
from ._embedding import Embedding, decode_logits


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
        if logit_soft_cap is not None and not logit_soft_cap > 0:
            raise ValueError(f"logit_soft_cap must be positive, got {logit_soft_cap}.")
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
        return decode_logits(
            self.weight, hidden, dtype=self.dtype, logit_soft_cap=self.logit_soft_cap
        )
