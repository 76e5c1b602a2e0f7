"""Language models built from `eqx_embed.nn`: `TransformerConfig` and `TransformerLM`.
Checkpoint interop lives in `eqx_embed.huggingface`, imported only when used."""

from ._cache import KVCache as KVCache
from ._config import TransformerConfig as TransformerConfig
from ._generation_config import GenerationConfig as GenerationConfig
from ._lora import (
    add_lora as add_lora,
    lora_filter as lora_filter,
    merge_lora as merge_lora,
)
from ._quantize import (
    dequantize as dequantize,
    quantize as quantize,
    unquantized_filter as unquantized_filter,
)
from ._sharding import (
    model_partition_specs as model_partition_specs,
    shard_batch as shard_batch,
    shard_model as shard_model,
    sharding_rules as sharding_rules,
)
from ._transformer import TransformerLM as TransformerLM
