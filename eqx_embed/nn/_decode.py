from typing import Any

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

from ._contracts import check_feature_size, checked
from ._embedding import Embedding
from ._indices import IntegerSequence, check_indices
from ._loss import (
    check_ignore_index,
    check_loss_controls,
    fused_cross_entropy,
    fused_log_sum_exp,
    fused_weighted_cross_entropy,
    kept_where,
)
from ._mesh import first_columns, on_explicit_mesh
from ._mesh_token_layout import check_token_layout
from ._numerics import check_soft_cap
from ._table_kind import (
    Table,
    TableKind,
    dot_with_table,
    promoted_dtype,
    rows_function,
)


class EmbeddingDecode(eqx.Module):
    """Maps hidden states back to vocabulary logits with an embedding's own table.

    It holds the `Embedding` itself, so its table is the very same leaf as the
    lookup's: build it from the stored embedding where you need it (in `__call__`, or
    through [`ReversibleEmbedding`][eqx_embed.ReversibleEmbedding]), and do not store
    it next to that embedding in a model, or the table becomes two leaves that
    training pulls apart (the weight tying guide explains the trap).

    **Raises:**

    - `ValueError`: a `logit_soft_cap` that is not positive; a hidden state whose width
        is not the table's `embedding_size`; a target outside the table under the
        embedding's `out_of_range="error"`; on explicit mesh axes, hidden states or
        targets split over a mesh axis that also splits the table's vocabulary (the
        scaling-out guide says why).
    - `jaxtyping.TypeCheckError`: a batch passed to the per-token `__call__`, targets
        that are not integers or do not match the hidden states' `tokens` axis.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    embedding = eqx_embed.Embedding(100, 16, key=jax.random.key(0))
    hidden = jax.random.normal(jax.random.key(1), (5, 16))
    decode = eqx_embed.EmbeddingDecode(embedding)  # built where needed, never stored
    logits = jax.vmap(decode)(hidden)
    loss = decode.cross_entropy(hidden, jnp.array([1, 2, 3, 4, 5]))
    assert logits.shape == (5, 100) and loss.shape == (5,)
    ```
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
            check_soft_cap("logit_soft_cap", logit_soft_cap)
        self.embedding = embedding
        self.logit_soft_cap = None if logit_soft_cap is None else float(logit_soft_cap)
        self.dtype = None if dtype is None else jnp.dtype(dtype)

    @property
    def weight(self) -> Table:
        """The table, the same array (or table kind) as `self.embedding.weight`."""
        return self.embedding.weight

    def _loss_options(self, hidden: Array) -> dict[str, Any]:
        """The fused losses' compute dtype and the plug-in reading the table's rows:
        for a table kind, whose rows the losses cannot promote themselves, the
        compute dtype defaults to that of its rows and `hidden`."""
        dtype = self.dtype
        if dtype is None and isinstance(self.weight, TableKind):
            dtype = promoted_dtype(self.weight, hidden)
        return dict(dtype=dtype, rows=rows_function(self.weight))

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
        self._check_hidden(hidden, method="EmbeddingDecode.__call__")
        logits = dot_with_table(
            self.weight, hidden, dtype=self.dtype, soft_cap=self.logit_soft_cap
        )
        if self.embedding._is_padded():
            # As `Embedding.attend`: only a padded table has columns to drop.
            return first_columns(logits, self.embedding.num_embeddings)
        return logits

    def _check_hidden(self, hidden: Array, *, method: str) -> None:
        check_feature_size(
            hidden,
            self.embedding.embedding_size,
            name="hidden",
            owner="table's embedding_size",
        )
        # A table kind runs the one-device walks (no mesh layout is checked).
        table = self.weight
        if not isinstance(table, TableKind) and on_explicit_mesh(table, hidden):
            check_token_layout(table, dict(hidden=hidden), method=method)

    def _check_loss_inputs(
        self,
        hidden: Array,
        targets: Any,
        where: Any,
        controls: tuple[float, float, int | None],
        method: str,
    ) -> tuple[Array, Array | None]:
        self._check_hidden(hidden, method=method)
        z_loss, label_smoothing, ignore_index = controls
        check_loss_controls(z_loss, label_smoothing)
        check_ignore_index(ignore_index, self.embedding.num_embeddings)
        where = kept_where(targets, where, ignore_index)
        # Masked-out and ignored targets are never looked up: they may be anything.
        targets = check_indices(
            targets,
            size=self.embedding.num_embeddings,
            out_of_range=self.embedding.out_of_range,
            name="target",
            negative_from_end=False,
            where=where,
        )
        table = self.weight
        if not isinstance(table, TableKind) and on_explicit_mesh(
            table, hidden, targets
        ):
            check_token_layout(table, dict(targets=targets), method=method)
        return targets, where

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
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
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
            Finite and non-negative.
        - `block_size`: the number of vocabulary rows per block. Positive; one
            larger than the vocabulary means one block. Defaults to 2048. The
            temporaries grow with `tokens * (block_size + embedding_size)`, never
            with `tokens * num_embeddings`; the sweep of block sizes and the
            memory figures are on the performance page
            (`benchmarks/bench_fused_loss.py`).
        - `label_smoothing`: `s` in `[0, 1)`: the target becomes `1 - s` of the
            one-hot target plus `s` of the uniform distribution over the
            `num_embeddings` ids (never a padded table's padding rows), as torch's
            `F.cross_entropy(label_smoothing=s)`: the loss is then
            `lse - (1 - s) * logits[target] - s * mean(logits) + z_loss * lse**2`.
        - `ignore_index`: a target id that counts as masked out (`where` False):
            `-100` for Hugging Face data, as torch's `ignore_index`. It may not be
            an id of the vocabulary, `[0, num_embeddings)` (a `ValueError`: mask a
            real id with `where`). `None` (the default) ignores no id.

        **Returns:**

        The per-token losses, shape `(tokens,)`, float32 (float64 for a float64
        compute dtype). Reduce them as you like: `losses.sum() / where.sum()`; for
        a mean or a weighted sum with weights known up front,
        [`mean_cross_entropy`][eqx_embed.EmbeddingDecode.mean_cross_entropy] is
        faster (three matmuls instead of four).
        """
        targets, where = self._check_loss_inputs(
            hidden,
            targets,
            where,
            (z_loss, label_smoothing, ignore_index),
            "EmbeddingDecode.cross_entropy",
        )
        return fused_cross_entropy(
            self.weight,
            hidden,
            targets,
            where=where,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            vocab_axes=self.embedding.vocab_axes,
            logit_soft_cap=self.logit_soft_cap,
            block_size=block_size,
            num_rows=self.embedding.num_embeddings,
            **self._loss_options(hidden),
        )

    @jax.named_scope("eqx_embed.EmbeddingDecode.mean_cross_entropy")
    @checked
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
        """The training loss: the mean over the tokens where `where` is True of
        [`cross_entropy`][eqx_embed.EmbeddingDecode.cross_entropy] (or, given
        `weights`, their weighted sum), as one scalar, with both gradients computed
        in the forward pass (Liger's fused linear cross-entropy): three matmuls, as
        the plain loss, where the per-token `cross_entropy` needs four, and no
        `(tokens, num_embeddings)` array. Values and targets' policy as
        `cross_entropy`.

        Pass all the tokens of a batch at once, flattened to `(tokens,
        embedding_size)`: under `jax.vmap` each example would make a table gradient
        of its own (and a mean of per-example means is not the mean over tokens).

        **Arguments:**

        - `hidden`: the hidden states, shape `(tokens, embedding_size)`.
        - `targets`: the target token ids, shape `(tokens,)`, checked as for
            `cross_entropy`.
        - `where`: optional, shape `(tokens,)`: only these tokens count, and the
            mean divides by their number (by 1 when there are none, so that a batch
            of padding gives 0, not NaN). Masked-out targets are ignored.
        - `weights`: optional, shape `(tokens,)`: the result is then
            `sum(weights * losses)` over the tokens `where` keeps, without
            division (`weights = 1 / global_count` gives a mean over several
            calls, as in gradient accumulation). Differentiable.
        - `z_loss`: as for `cross_entropy`.
        - `chunk_size`: tokens per chunk, each against the whole vocabulary.
            Positive. Defaults to about 16M logits per chunk (524 tokens for a
            32k vocabulary). The temporaries are a few
            `(chunk_size, num_embeddings)` float32 arrays plus a float32
            accumulator of the table's shape (for a float32 table, the gradient
            itself), so more than `cross_entropy`'s: use `cross_entropy` where
            memory matters more than speed (the figures of both are on the
            performance page, `benchmarks/bench_fused_loss.py`).
        - `label_smoothing`, `ignore_index`: as for `cross_entropy`; ignored
            targets count as masked out (torch's mean: over the targets that are
            not `ignore_index`).

        **Returns:**

        A scalar, float32 (float64 for a float64 compute dtype).
        """
        targets, where = self._check_loss_inputs(
            hidden,
            targets,
            where,
            (z_loss, label_smoothing, ignore_index),
            "EmbeddingDecode.mean_cross_entropy",
        )
        if weights is None:
            count = targets.shape[0] if where is None else jnp.sum(where)
            weights = jnp.ones(targets.shape, jnp.float32) / jnp.maximum(count, 1)
        weights = jnp.asarray(weights)
        if where is not None:
            weights = jnp.where(where, weights, 0)
            # A NaN or an infinity in a masked-out row must not reach the table's
            # gradient (its zero weight times a NaN softmax is NaN).
            hidden = jnp.where(where[:, None], hidden, 0)
        return fused_weighted_cross_entropy(
            self.weight,
            hidden,
            targets,
            weights,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            vocab_axes=self.embedding.vocab_axes,
            logit_soft_cap=self.logit_soft_cap,
            chunk_size=chunk_size,
            num_rows=self.embedding.num_embeddings,
            **self._loss_options(hidden),
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
        self._check_hidden(hidden, method="EmbeddingDecode.log_sum_exp")
        return fused_log_sum_exp(
            self.weight,
            hidden,
            logit_soft_cap=self.logit_soft_cap,
            block_size=block_size,
            num_rows=self.embedding.num_embeddings,
            **self._loss_options(hidden),
        )
