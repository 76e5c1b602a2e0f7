"""Language models built from `eqx_embed.nn`: `TransformerConfig` and `TransformerLM`.
Checkpoint interop lives in `eqx_embed.huggingface`, imported only when used."""

from ._cache import KVCache as KVCache
from ._config import TransformerConfig as TransformerConfig
from ._transformer import TransformerLM as TransformerLM
