"""GPT-NeoX (`GPTNeoXForCausalLM`, Pythia): LayerNorm with biases, a plain GELU MLP,
biases everywhere, a parallel residual, RoPE on a quarter of each head, and the query,
key and value projections fused per head in the files."""

from ._spec import FamilySpec, Presets

GPT_NEOX = FamilySpec(
    name="gpt_neox",
    presets=Presets(
        norm="layer",
        gated_mlp=False,
        scale_embeddings=False,
        sandwich_norms=False,
        parallel_residual=True,
        norm_eps=1e-5,
        hidden_act="gelu",
        attention_bias=True,
        attention_output_bias=True,
        mlp_bias=True,
        partial_rotary_factor=0.25,
    ),
)
