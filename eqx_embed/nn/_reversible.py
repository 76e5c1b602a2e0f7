from typing import Unpack

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, DTypeLike, Float, Integer, PRNGKeyArray

from ._contracts import checked
from ._decode import EmbeddingDecode
from ._embedding import Embedding, EmbeddingOptions, TokenId
from ._indices import IntegerSequence
from ._table_kind import Table


class ReversibleEmbedding(eqx.Module):
    """A token lookup and its reverse projection to logits in one module, as keras_hub's
    `ReversibleEmbedding`.

    Tied (the default), one table serves both directions and is exactly one leaf of
    the module: gradients from the lookup and the decode add up in it, and optimisers,
    serialisation and `jax.tree_util` see it once. Untied, the decode has its own table
    of the same shape.

    **Raises:**

    - `ValueError`: as [`Embedding`][eqx_embed.Embedding] and
        [`EmbeddingDecode`][eqx_embed.EmbeddingDecode] do, and for a `reverse_weight`
        given to a tied module or of another shape than the lookup table.
    - `jaxtyping.TypeCheckError`: as `Embedding` and `EmbeddingDecode` do.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    layer = eqx_embed.ReversibleEmbedding(100, 16, key=jax.random.key(0))
    tokens = jnp.array([5, 6, 7])
    hidden = jax.vmap(layer)(tokens)
    logits = jax.vmap(layer.decode)(hidden)
    loss = layer.cross_entropy(hidden, jnp.array([6, 7, 8]))
    assert logits.shape == (3, 100) and loss.shape == (3,)
    assert len(jax.tree.leaves(layer)) == 1  # tied: one table, one leaf
    ```
    """

    embedding: Embedding
    reverse_embedding: Embedding | None
    logit_soft_cap: float | None = eqx.field(static=True)
    reverse_dtype: jnp.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        num_embeddings: int | None = None,
        embedding_size: int | None = None,
        weight: Float[ArrayLike, "num_embeddings embedding_size"] | None = None,
        *,
        tie_weights: bool = True,
        reverse_weight: Float[ArrayLike, "num_embeddings embedding_size"] | None = None,
        logit_soft_cap: float | None = None,
        reverse_dtype: DTypeLike | None = None,
        key: PRNGKeyArray | None = None,
        **embedding_options: Unpack[EmbeddingOptions],
    ):
        """**Arguments:**

        - `num_embeddings`, `embedding_size`, `weight`, `key`, and the
            `embedding_options` `dtype`, `param_dtype`, `init`, `padding_idx` and
            `out_of_range` (keyword only): as for [`Embedding`][eqx_embed.Embedding],
            for the lookup table.
        - `tie_weights`: whether the decode uses the lookup table (the default) or a
            table of its own.
        - `reverse_weight`: with `tie_weights=False`, the decode table, of the same
            shape as the lookup's. If omitted, one is drawn with `init` from a key
            split off `key`.
        - `logit_soft_cap`: as for [`EmbeddingDecode`][eqx_embed.EmbeddingDecode].
        - `reverse_dtype`: the compute dtype of the decode (keras' `reverse_dtype`).
        """
        if tie_weights and reverse_weight is not None:
            raise ValueError("reverse_weight is only for tie_weights=False.")
        reverse_key = None
        if key is not None:
            key, reverse_key = jax.random.split(key)
        self.embedding = Embedding(
            num_embeddings, embedding_size, weight, key=key, **embedding_options
        )
        if tie_weights:
            self.reverse_embedding = None
        else:
            shape = (self.embedding.num_embeddings, self.embedding.embedding_size)
            if reverse_weight is not None and np.shape(reverse_weight) != shape:
                raise ValueError(
                    f"reverse_weight must have the lookup table's shape {shape}, got "
                    f"{np.shape(reverse_weight)}."
                )
            if reverse_weight is None and reverse_key is None:
                raise ValueError(
                    "tie_weights=False needs either `reverse_weight=...` or a `key` "
                    "to draw the decode table with."
                )
            # A drawn decode table takes the lookup table's dtype; a given one is
            # cast by `param_dtype` as the lookup table is.
            table_options = EmbeddingOptions()
            if "init" in embedding_options:
                table_options["init"] = embedding_options["init"]
            if "param_dtype" in embedding_options:
                table_options["param_dtype"] = embedding_options["param_dtype"]
            if reverse_weight is None:
                table_options["param_dtype"] = self.embedding.weight.dtype
            self.reverse_embedding = Embedding(
                *shape,
                reverse_weight,
                key=reverse_key if reverse_weight is None else None,
                **table_options,
            )
        # Validated by EmbeddingDecode; stored in its normalised form.
        decoder = EmbeddingDecode(
            self.embedding, logit_soft_cap=logit_soft_cap, dtype=reverse_dtype
        )
        self.logit_soft_cap = decoder.logit_soft_cap
        self.reverse_dtype = decoder.dtype

    @property
    def tie_weights(self) -> bool:
        """Whether lookup and decode share one table."""
        return self.reverse_embedding is None

    @property
    def weight(self) -> Table:
        """The lookup table, `embedding.weight` (tied, the decode's table too): a
        float array, or a table kind such as a `QuantizedTable`."""
        return self.embedding.weight

    @property
    def decoder(self) -> EmbeddingDecode:
        """The decode direction as an [`EmbeddingDecode`][eqx_embed.EmbeddingDecode]
        over the module's own (tied or untied) table. Built on access, never stored,
        so tying survives every transformation."""
        table = self.reverse_embedding
        if table is None:
            table = self.embedding
        return EmbeddingDecode(
            table, logit_soft_cap=self.logit_soft_cap, dtype=self.reverse_dtype
        )

    @checked
    def quantize(
        self, mode: str, *, group_size: int | None = None
    ) -> "ReversibleEmbedding":
        """This module with its table (tied) or both tables (untied) quantized, as
        keras' `ReversibleEmbedding.quantize(mode)`; see
        [`Embedding.quantize`][eqx_embed.Embedding.quantize]. Tied, the lookup and
        the decode keep reading one (quantized) leaf.

        **Arguments:**

        - `mode`, `group_size`: as for `Embedding.quantize`.

        **Returns:**

        A new `ReversibleEmbedding`.
        """
        layer = eqx.tree_at(
            lambda layer: layer.embedding,
            self,
            self.embedding.quantize(mode, group_size=group_size),
        )
        if self.reverse_embedding is None:
            return layer
        return eqx.tree_at(
            lambda layer: layer.reverse_embedding,
            layer,
            self.reverse_embedding.quantize(mode, group_size=group_size),
        )

    @checked
    def __call__(
        self, token: TokenId, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " embedding_size"]:
        """Looks up one token; see [`Embedding.__call__`][eqx_embed.Embedding.__call__].

        **Arguments:**

        - `token`: one token id, a scalar integer. Use `jax.vmap` for many.
        - `key`: ignored.

        **Returns:**

        The token's row, shape `(embedding_size,)`.
        """
        return self.embedding(token)

    @checked
    def decode(
        self, hidden: Float[Array, " embedding_size"]
    ) -> Float[Array, " num_embeddings"]:
        """Projects one hidden state back to vocabulary logits; see
        [`EmbeddingDecode.__call__`][eqx_embed.EmbeddingDecode.__call__].

        **Arguments:**

        - `hidden`: one hidden state of width `embedding_size`.

        **Returns:**

        The logits, shape `(num_embeddings,)`.
        """
        return self.decoder(hidden)

    # The fused loss and its normaliser, exactly as the decoder computes them (its
    # checks and messages included); tied, their gradients reach the lookup table.

    def cross_entropy(
        self,
        hidden: Float[Array, "tokens embedding_size"],
        targets: Integer[ArrayLike, " tokens"] | IntegerSequence,
        *,
        where: Bool[ArrayLike, " tokens"] | None = None,
        z_loss: float = 0.0,
        block_size: int | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
    ) -> Float[Array, " tokens"]:
        """The per-token fused cross-entropy of the decoded logits: exactly
        [`EmbeddingDecode.cross_entropy`][eqx_embed.EmbeddingDecode.cross_entropy] on
        this module's decoder (same arguments, checks and results; tied, the table's
        gradient adds to the lookup's).
        """
        return self.decoder.cross_entropy(
            hidden,
            targets,
            where=where,
            z_loss=z_loss,
            block_size=block_size,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
        )

    def mean_cross_entropy(
        self,
        hidden: Float[Array, "tokens embedding_size"],
        targets: Integer[ArrayLike, " tokens"] | IntegerSequence,
        *,
        where: Bool[ArrayLike, " tokens"] | None = None,
        weights: Float[ArrayLike, " tokens"] | None = None,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
    ) -> Float[Array, ""]:
        """The mean (or weighted sum) fused cross-entropy, one scalar: exactly
        [`EmbeddingDecode.mean_cross_entropy`][eqx_embed.EmbeddingDecode.mean_cross_entropy]
        on this module's decoder.
        """
        return self.decoder.mean_cross_entropy(
            hidden,
            targets,
            where=where,
            weights=weights,
            z_loss=z_loss,
            chunk_size=chunk_size,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
        )

    def log_sum_exp(
        self,
        hidden: Float[Array, "tokens embedding_size"],
        *,
        block_size: int | None = None,
    ) -> Float[Array, " tokens"]:
        """The blockwise log-sum-exp of the decoded logits per token: exactly
        [`EmbeddingDecode.log_sum_exp`][eqx_embed.EmbeddingDecode.log_sum_exp] on this
        module's decoder.
        """
        return self.decoder.log_sum_exp(hidden, block_size=block_size)
