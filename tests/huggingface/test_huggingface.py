"""`TransformerLM.from_huggingface` / `to_huggingface` against `transformers` itself:
tiny random models of every family, built and run locally with PyTorch on CPU."""

import dataclasses
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from eqx_embed import TransformerConfig, TransformerLM

VOCAB = 128
SEQ = 16  # longer than every sliding window below
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
LLAMA31_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
CASES = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "llama3.1-tied": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2, tie_word_embeddings=True, rope_scaling=LLAMA31_ROPE
        ),
    ),
    "llama-biases": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=5),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            num_key_value_heads=2,
            head_dim=24,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
        ),
    ),
    "gemma": (transformers.GemmaConfig, dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            num_hidden_layers=7,  # two groups of five sliding layers and a full one
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {
                    "rope_type": "linear",
                    "factor": 8.0,
                    "rope_theta": 1_000_000.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
    "gpt2": (transformers.GPT2Config, dict(n_inner=80)),
    "gpt2-untied": (
        transformers.GPT2Config,
        dict(tie_word_embeddings=False, activation_function="gelu"),
    ),
    "gpt_neox": (transformers.GPTNeoXConfig, dict()),
    "gpt_neox-sequential": (
        transformers.GPTNeoXConfig,
        dict(use_parallel_residual=False, rotary_pct=0.5),
    ),
}
WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3")


def randomise(model: torch.nn.Module, *, unit_offset_norms: bool) -> None:
    """Weights of order one (transformers' own init makes logits of order 1e-2, which
    would pass any tolerance), norms and biases included."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 2:
                parameter.copy_(noise / parameter.shape[1] ** 0.5)
            else:
                is_scale = "norm" in name and name.endswith("weight")
                mean = 1.0 if is_scale and not unit_offset_norms else 0.0
                parameter.copy_(mean + 0.3 * noise)


def build(case: str) -> torch.nn.Module:
    config_class, settings = CASES[case]
    config = config_class(**{**COMMON, **settings})
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager"
    )
    randomise(model, unit_offset_norms=case.startswith("gemma"))
    return model.eval()


def hf_logits(model: torch.nn.Module, tokens: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, str]]:
    """Each case's transformers model and the directory it saved itself to."""
    root = tmp_path_factory.mktemp("checkpoints")
    saved = {}
    for case in CASES:
        model = build(case)
        model.save_pretrained(root / case)
        saved[case] = (model, str(root / case))
    return saved


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[str, TransformerLM]:
    return {
        case: TransformerLM.from_huggingface(path)
        for case, (_, path) in checkpoints.items()
    }


def ours(model: TransformerLM, tokens: np.ndarray, **kwargs) -> np.ndarray:
    return np.asarray(jax.vmap(model)(jnp.asarray(tokens), **kwargs))


@pytest.fixture(scope="module")
def logits(loaded, tokens) -> dict[str, np.ndarray]:
    return {case: ours(model, tokens) for case, model in loaded.items()}


def assert_same_weights(model: TransformerLM, other: TransformerLM) -> None:
    assert model.config == other.config
    leaves, structure = jax.tree.flatten(model)
    other_leaves, other_structure = jax.tree.flatten(other)
    assert structure == other_structure
    for leaf, other_leaf in zip(leaves, other_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other_leaf))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, checkpoints, logits, tokens):
    hf_model, _ = checkpoints[case]
    expected = hf_logits(hf_model, tokens)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits[case], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", WINDOWED)
def test_the_sliding_window_is_exercised(case, loaded, logits, tokens):
    """Without its window, the same model gives other logits: the sequences are long
    enough for the windows to matter, so the parity test covers them."""
    model = loaded[case]
    assert any(window is not None for window in model.config.layer_windows)
    full = dataclasses.replace(model.config, sliding_window=None, layer_types=None)
    unwindowed = TransformerLM(
        full,
        embedding=model.embedding,
        blocks=model.blocks,
        final_norm=model.final_norm,
    )
    assert np.abs(ours(unwindowed, tokens) - logits[case]).max() > 1e-2


def test_families_and_settings_are_read(loaded):
    assert {case: model.config.family for case, model in loaded.items()} == {
        "llama": "llama",
        "llama3.1-tied": "llama",
        "llama-biases": "llama",
        "mistral": "mistral",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma": "gemma",
        "gemma2": "gemma2",
        "gemma3": "gemma3_text",
        "gpt2": "gpt2",
        "gpt2-untied": "gpt2",
        "gpt_neox": "gpt_neox",
        "gpt_neox-sequential": "gpt_neox",
    }
    assert loaded["qwen2"].config.layer_windows == (None, 5)
    assert loaded["gemma2"].config.layer_windows == (4, None)
    assert loaded["gemma3"].config.layer_windows == (4,) * 5 + (None, 4)
    assert loaded["gemma3"].config.rope_local_theta == 100.0
    assert loaded["gemma3"].rope.theta == 1e6
    assert loaded["gemma3"].rope.rope_type == "linear"
    assert loaded["gemma3"].local_rope.theta == 100.0
    assert loaded["qwen3"].config.qk_norm and loaded["gemma3"].config.qk_norm
    assert loaded["mistral"].config.layer_windows == (5, 5)
    assert loaded["gpt_neox"].config.rotary_dim == 4  # 16 * rotary_pct 0.25
    assert loaded["gpt_neox"].config.parallel_residual
    assert loaded["llama3.1-tied"].rope.rope_type == "llama3"
    assert loaded["llama3.1-tied"].embedding.tie_weights
    assert loaded["gemma"].embedding.tie_weights
    assert not loaded["llama"].embedding.tie_weights
    assert not loaded["gpt_neox"].embedding.tie_weights


def test_gemma3_rotates_its_sliding_layers_with_their_own_theta(loaded, logits, tokens):
    """Both RoPEs matter: with the full layers' RoPE everywhere (what equinox's
    theta-blind cache would give), the logits move far from transformers'."""
    model = loaded["gemma3"]
    one_rope = TransformerLM(
        dataclasses.replace(model.config, rope_local_theta=None), **model.parts()
    )
    assert one_rope.local_rope is None
    assert np.abs(ours(one_rope, tokens) - logits["gemma3"]).max() > 1e-2


@pytest.mark.parametrize("case", ["llama", "gemma2", "gemma3", "gpt_neox", "gpt2"])
def test_positions_match_transformers_position_ids(case, checkpoints, loaded, tokens):
    hf_model, _ = checkpoints[case]
    positions = np.stack([np.arange(SEQ) + 7, np.arange(SEQ) * 2 + 1])
    expected = hf_logits(hf_model, tokens, position_ids=torch.tensor(positions))
    actual = ours(loaded[case], tokens, token_positions=jnp.asarray(positions))
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gemma2"])  # with the final soft cap
def test_score_and_loss_match_torch_cross_entropy(case, checkpoints, loaded, tokens):
    hf_model, _ = checkpoints[case]
    logits = torch.tensor(hf_logits(hf_model, tokens), dtype=torch.float64)
    targets = np.roll(tokens, -1, axis=1)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1), reduction="none"
    ).numpy()
    model = loaded[case]
    loss = jax.vmap(model.loss)(jnp.asarray(tokens), jnp.asarray(targets))
    score = jax.vmap(model.score)(jnp.asarray(tokens), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(loss).ravel(), expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(score).ravel(), -expected, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_to_huggingface_round_trip(case, checkpoints, loaded, tokens, tmp_path):
    hf_model, _ = checkpoints[case]
    loaded[case].to_huggingface(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(back) is type(hf_model)
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(hf_model, tokens))
    # And the written directory reads back as the same model.
    assert_same_weights(TransformerLM.from_huggingface(tmp_path), loaded[case])


def test_sharded_checkpoint(checkpoints, tokens, tmp_path):
    hf_model, _ = checkpoints["qwen2"]
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    model = TransformerLM.from_huggingface(tmp_path)
    np.testing.assert_allclose(
        ours(model, tokens), hf_logits(hf_model, tokens), atol=1e-4, rtol=0
    )


def test_gpt2_base_model_files_without_the_prefix(checkpoints, tokens, tmp_path):
    """The gpt2 checkpoints on the Hub hold `GPT2Model`'s weights (`h.0.attn...`,
    `wte`), with the head tied to `wte`."""
    hf_model, _ = checkpoints["gpt2"]
    hf_model.transformer.save_pretrained(tmp_path)
    model = TransformerLM.from_huggingface(tmp_path)
    np.testing.assert_allclose(
        ours(model, tokens), hf_logits(hf_model, tokens), atol=1e-4, rtol=0
    )


def test_loading_needs_no_pytorch(checkpoints):
    _, path = checkpoints["gpt_neox"]
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import jax.numpy as jnp, eqx_embed\n"
        f"model = eqx_embed.TransformerLM.from_huggingface({path!r})\n"
        "print(model(jnp.arange(5)).shape)\n"
    )
    environment = {**os.environ, "JAXTYPING_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"(5, {VOCAB})"


def test_bfloat16_checkpoint(checkpoints, loaded, logits, tokens, tmp_path):
    hf_model, _ = checkpoints["llama"]
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf_model.to(torch.float32)
    model = TransformerLM.from_huggingface(tmp_path / "bf16")
    assert model.config.param_dtype == "bfloat16"
    assert model.config.activation_dtype == "bfloat16"
    expected = torch.tensor(np.asarray(loaded["llama"].blocks.mlp.up.weight))
    np.testing.assert_array_equal(
        np.asarray(model.blocks.mlp.up.weight, dtype=np.float32),
        expected.to(torch.bfloat16).float().numpy(),
    )
    # bfloat16 activations stay within bfloat16's error of the float32 model.
    reference = logits["llama"]
    actual = ours(model, tokens).astype(np.float32)
    assert np.abs(actual - reference).max() < 0.1 * np.abs(reference).max()
    # Written back (as float32 tensors, exactly) with the dtype in config.json.
    model.to_huggingface(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == (
        "bfloat16"
    )
    again = TransformerLM.from_huggingface(tmp_path / "back")
    assert again.blocks.mlp.up.weight.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(again.blocks.mlp.up.weight, dtype=np.float32),
        np.asarray(model.blocks.mlp.up.weight, dtype=np.float32),
    )


def edited_checkpoint(source: str, destination, **changes):
    """A copy of a checkpoint directory with config.json keys changed (`None`
    removes a key)."""
    destination.mkdir()
    for file in os.listdir(source):
        if file != "config.json":
            os.symlink(os.path.join(source, file), destination / file)
    with open(os.path.join(source, "config.json")) as file:
        values = json.load(file)
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    (destination / "config.json").write_text(json.dumps(values))
    return destination


@pytest.mark.parametrize(
    "case, changes, message",
    [
        ("llama", dict(hidden_act="gelu_fast"), "hidden_act must be one of"),
        (
            "llama",
            dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)),
            "rope_type='dynamic'",
        ),
        ("llama", dict(quantization_config=dict(bits=4)), "quantization_config"),
        ("llama", dict(sliding_window=4), "sliding_window=4"),
        ("mistral", dict(attention_bias=True), "attention_bias=True"),
        ("qwen2", dict(use_mrope=True), "use_mrope=True"),
        ("gemma", dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
        ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional"),
        ("gpt_neox", dict(head_dim=8), "head_dim=8"),
        ("gpt_neox", dict(model_type="opt"), "model_type='opt'"),
        (
            "gpt2",
            dict(scale_attn_by_inverse_layer_idx=True),
            "scale_attn_by_inverse_layer_idx=True",
        ),
        ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights=False"),
        ("gpt2", dict(rotary_pct=0.5), "'partial_rotary_factor': 0.5"),
        ("llama", dict(hidden_size=None), "no 'hidden_size'"),
    ],
)
def test_unsupported_config_raises(case, changes, message, checkpoints, tmp_path):
    _, path = checkpoints[case]
    edited = edited_checkpoint(path, tmp_path / "edited", **changes)
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        TransformerLM.from_huggingface(edited)


def test_weights_that_disagree_with_the_config_raise(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = checkpoints["llama"]
    tensors = load_file(os.path.join(path, "model.safetensors"))

    def variant(name, tensors):
        directory = tmp_path / name
        directory.mkdir()
        os.symlink(os.path.join(path, "config.json"), directory / "config.json")
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory

    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"no model\.layers\.1\.mlp\.up_proj\.weight"):
        TransformerLM.from_huggingface(variant("missing", missing))
    extra = {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(16, "f4")}
    with pytest.raises(ValueError, match=r"q_norm"):
        TransformerLM.from_huggingface(variant("extra", extra))
    wrong = {**tensors, "model.norm.weight": np.ones(32, "f4")}
    with pytest.raises(ValueError, match=r"final_norm\.weight has shape \(32,\)"):
        TransformerLM.from_huggingface(variant("wrong", wrong))


def test_to_huggingface_refuses_what_the_family_cannot_express(tmp_path):
    for config, message in [
        (
            TransformerConfig("llama", 32, 16, 24, 1, 2, sliding_window=4),
            "sliding_window=4",
        ),
        (
            TransformerConfig("mistral", 32, 16, 24, 1, 2, attention_bias=True),
            "attention_bias=True",
        ),
        (
            TransformerConfig("qwen2", 32, 16, 24, 1, 2, attention_bias=False),
            "attention_bias=False",
        ),
        (
            TransformerConfig("llama", 32, 16, 24, 1, 2, final_logit_soft_cap=30.0),
            "final_logit_soft_cap=30.0",
        ),
    ]:
        # The config is checked before any weight is read, so shapes suffice.
        model = eqx.filter_eval_shape(TransformerLM, config, key=jax.random.key(0))
        with pytest.raises(ValueError, match=message):
            model.to_huggingface(tmp_path / config.family)
        assert not (tmp_path / config.family).exists()
