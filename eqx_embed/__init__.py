"""Token embeddings, tied decoding and rotary position embeddings for Equinox."""

from ._decode import EmbeddingDecode as EmbeddingDecode
from ._embedding import (
    Embedding as Embedding,
    Initializer as Initializer,
    default_embedding_init as default_embedding_init,
)
from ._indices import OutOfRange as OutOfRange
from ._reversible import ReversibleEmbedding as ReversibleEmbedding
from ._rope import (
    RopeRotation as RopeRotation,
    RotaryPositionalEmbedding as RotaryPositionalEmbedding,
)
from ._transformer import (
    TransformerConfig as TransformerConfig,
    TransformerLM as TransformerLM,
)

__version__ = "0.1.0"
