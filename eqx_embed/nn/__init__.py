"""The core: token embeddings, tied decoding, the fused cross-entropy, and position
embeddings (learned, sinusoidal and rotary). Imports nothing from `eqx_embed.models` or
`eqx_embed.huggingface`.

Its private modules are flat, as equinox's `nn/`, one concept each, grouped by name:

- shared: `_contracts` (the runtime checks of every public call) and `_numerics`
    (dtypes, the soft cap, the product of a table with a hidden state).
- lookup and decode: `_embedding`, `_indices` (what a bad index gives), `_decode`,
    `_reversible`, `_table_kind` (tables that are not plain arrays), `_quantize`
    (int8 and int4 tables).
- losses: `_loss_*` (the fused cross-entropies, one device and vocabulary-parallel).
- sharding, layered on top of the one-device paths and used only where explicit mesh
    axes are involved: `_mesh` (reading how an array is laid out on a mesh),
    `_mesh_token_layout` (token layouts refused on a mesh), `_mesh_padding`
    (vocabularies padded for a mesh).
- positions: `_position`, `_rope`, `_rope_rotate`, `_rope_scaling`, `_tables`.
"""

from ._decode import EmbeddingDecode as EmbeddingDecode
from ._embedding import (
    Embedding as Embedding,
    EmbeddingOptions as EmbeddingOptions,
    Initializer as Initializer,
    default_embedding_init as default_embedding_init,
)
from ._indices import OutOfRange as OutOfRange
from ._mesh_padding import pad_vocabulary as pad_vocabulary
from ._position import (
    PositionEmbedding as PositionEmbedding,
    SinusoidalPositionalEncoding as SinusoidalPositionalEncoding,
)
from ._quantize import QuantizedTable as QuantizedTable
from ._reversible import ReversibleEmbedding as ReversibleEmbedding
from ._rope import RotaryPositionalEmbedding as RotaryPositionalEmbedding
from ._rope_rotate import RopeRotation as RopeRotation
from ._table_kind import TableKind as TableKind
