"""Token embeddings, tied decoding and rotary position embeddings for Equinox.

- `eqx_embed.nn`: the core modules.
- `eqx_embed.models`: `TransformerConfig` and `TransformerLM`, built from the core.
- `eqx_embed.huggingface`: Hugging Face checkpoints, read and written with NumPy.

Every public name of `nn` and `models` is also importable from `eqx_embed` itself.
"""

# First, before the subpackages: an unsupported Python or JAX fails here, with one
# clear ImportError.
from . import _supported_versions as _supported_versions  # isort: skip
from . import models as models, nn as nn
from .models import (
    GenerationConfig as GenerationConfig,
    KVCache as KVCache,
    TransformerConfig as TransformerConfig,
    TransformerLM as TransformerLM,
    add_lora as add_lora,
    dequantize as dequantize,
    lora_filter as lora_filter,
    merge_lora as merge_lora,
    model_partition_specs as model_partition_specs,
    quantize as quantize,
    shard_batch as shard_batch,
    shard_model as shard_model,
    sharding_rules as sharding_rules,
    unquantized_filter as unquantized_filter,
)
from .nn import (
    Embedding as Embedding,
    EmbeddingDecode as EmbeddingDecode,
    EmbeddingOptions as EmbeddingOptions,
    Initializer as Initializer,
    OutOfRange as OutOfRange,
    PositionEmbedding as PositionEmbedding,
    QuantizedTable as QuantizedTable,
    ReversibleEmbedding as ReversibleEmbedding,
    RopeRotation as RopeRotation,
    RotaryPositionalEmbedding as RotaryPositionalEmbedding,
    SinusoidalPositionalEncoding as SinusoidalPositionalEncoding,
    TableKind as TableKind,
    default_embedding_init as default_embedding_init,
    pad_vocabulary as pad_vocabulary,
)

__version__ = "0.1.0"
