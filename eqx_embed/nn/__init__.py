"""The core: token embeddings, tied decoding, the fused cross-entropy, and position
embeddings (learned, sinusoidal and rotary). Imports nothing from `eqx_embed.models` or
`eqx_embed.huggingface`."""

from ._decode import EmbeddingDecode as EmbeddingDecode
from ._embedding import (
    Embedding as Embedding,
    EmbeddingOptions as EmbeddingOptions,
    Initializer as Initializer,
    default_embedding_init as default_embedding_init,
)
from ._indices import OutOfRange as OutOfRange
from ._position import (
    PositionEmbedding as PositionEmbedding,
    SinusoidalPositionalEncoding as SinusoidalPositionalEncoding,
)
from ._reversible import ReversibleEmbedding as ReversibleEmbedding
from ._rope import RotaryPositionalEmbedding as RotaryPositionalEmbedding
from ._rope_rotate import RopeRotation as RopeRotation
from ._vocab_padding import pad_vocabulary as pad_vocabulary
