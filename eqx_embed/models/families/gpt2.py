"""GPT-2 (`GPT2LMHeadModel`): learned absolute positions added to the token
embeddings, LayerNorm, a plain GELU (tanh) MLP, biases everywhere, a tied head; the
files store the projections as Hugging Face's `Conv1D`, `(in, out)`, with the query,
key and value projections fused in `c_attn`, and spell the sizes their own way
(`n_embd`, `n_layer`, ...)."""

from ._spec import FamilySpec, Presets

GPT2 = FamilySpec(
    name="gpt2",
    presets=Presets(
        norm="layer",
        gated_mlp=False,
        scale_embeddings=False,
        sandwich_norms=False,
        parallel_residual=False,
        norm_eps=1e-5,
        hidden_act="gelu_new",
        attention_bias=True,
        attention_output_bias=True,
        mlp_bias=True,
        partial_rotary_factor=1.0,
        position_embedding="learned",
    ),
)
