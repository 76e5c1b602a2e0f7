"""LoRA adapters to and from Hugging Face PEFT: adapters that `peft` writes onto tiny
random `transformers` models load onto `TransformerLM.from_huggingface`'s model with
PEFT's logits, and ours load with `peft.PeftModel.from_pretrained`, both ways, with
PEFT's tying semantics."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import eqx_embed
from eqx_embed import TransformerLM
from eqx_embed.huggingface import load_peft_adapter, save_peft_adapter
from eqx_embed.nn._lora import LoRATable

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
)
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
# case: (config, PEFT's LoraConfig settings)
CASES = {
    "llama": (
        transformers.LlamaConfig(num_key_value_heads=2, **COMMON),
        dict(target_modules=[*LLAMA_LINEARS, "embed_tokens", "lm_head"]),
    ),
    "qwen2": (
        transformers.Qwen2Config(num_key_value_heads=2, **COMMON),
        dict(target_modules=LLAMA_LINEARS, rank_pattern={"v_proj": 2}),
    ),
    "gemma-tied": (
        transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **COMMON),
        dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
    ),
    "gemma-lookup-only": (
        transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **COMMON),
        dict(target_modules=["up_proj", "embed_tokens"]),
    ),
    "gpt2": (
        transformers.GPT2Config(**COMMON),
        dict(target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"]),
    ),
}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 8))


def logits_of(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def ours(model: TransformerLM) -> np.ndarray:
    return np.asarray(jax.vmap(model)(jnp.asarray(TOKENS)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each case's base checkpoint directory, PEFT's adapter directory for it and
    PEFT's logits."""
    root = tmp_path_factory.mktemp("peft")
    cases = {}
    for case, (config, settings) in CASES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim == 2:
                    parameter.copy_(torch.randn(parameter.shape) / 6)
        model.save_pretrained(root / case / "base")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes on tied embeddings
            adapted = peft.get_peft_model(
                model,
                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings),
            ).eval()
        with torch.no_grad():
            # PEFT leaves these at zero (or a copy) even without its init.
            for name, parameter in adapted.named_parameters():
                if "lora_embedding_A" in name or "modules_to_save" in name:
                    parameter.add_(torch.randn(parameter.shape) / 4)
            adapted.save_pretrained(root / case / "adapter")
        cases[case] = (root / case, logits_of(adapted))
    return cases


@pytest.fixture(scope="module")
def loaded(written):
    return {
        case: load_peft_adapter(
            TransformerLM.from_huggingface(directory / "base"), directory / "adapter"
        )
        for case, (directory, _) in written.items()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapters_load_with_peft_logits(case, written, loaded):
    _, expected = written[case]
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(ours(loaded[case]), expected, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_saved_adapters_load_in_peft_with_our_logits(case, written, loaded, tmp_path):
    directory, _ = written[case]
    model = loaded[case]
    if case == "gpt2":
        # modules_to_save were loaded into the weights: save the base that has them.
        model = eqx_embed.merge_lora(model)
        model.to_huggingface(tmp_path / "base")
        model = eqx_embed.add_lora(
            model,
            rank=3,
            alpha=5,
            targets=["query_proj", "mlp.up", "output_proj"],
            key=jax.random.key(0),
        )
        model = jax.tree.map(
            lambda x: x + 0.1 if x.ndim == 3 and x.shape[-1] == 3 else x, model
        )
        base_directory = tmp_path / "base"
    else:
        base_directory = directory / "base"
    save_peft_adapter(model, tmp_path / "ours")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        base_directory, attn_implementation="eager"
    )
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    expected = ours(model)
    np.testing.assert_allclose(logits_of(theirs), expected, atol=2e-4, rtol=1e-5)


def test_tying_follows_peft(loaded):
    """With `ensure_weight_tying`, one adapter on the one table serves the lookup
    and the decode; without it, PEFT adapts the lookup only, so the model is loaded
    untied and its decode keeps the base table."""
    tied = loaded["gemma-tied"]
    assert tied.embedding.tie_weights
    assert isinstance(tied.embedding.embedding.weight, LoRATable)
    lookup_only = loaded["gemma-lookup-only"]
    assert not lookup_only.embedding.tie_weights
    assert isinstance(lookup_only.embedding.embedding.weight, LoRATable)
    base = lookup_only.embedding.reverse_embedding.weight
    np.testing.assert_array_equal(base, lookup_only.embedding.embedding.weight.base)


def rewritten(directory, tmp_path, **changes):
    """A copy of PEFT's adapter directory with `adapter_config.json` changed."""
    target = tmp_path / "changed"
    target.mkdir()
    values = json.loads((directory / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**values, **changes}))
    weights = "adapter_model.safetensors"
    (target / weights).write_bytes((directory / weights).read_bytes())
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(use_dora=True), "use_dora=True is not supported"),
        (dict(use_rslora=True), "use_rslora=True is not supported"),
        (dict(peft_type="IA3"), "peft_type must be 'LORA', got 'IA3'"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is not"),
        (
            dict(auto_mapping=dict(base_model_class="GPT2LMHeadModel")),
            "the adapter is for GPT2LMHeadModel, but the model is LlamaForCausalLM",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(
    written, loaded, tmp_path, changes, message
):
    directory, _ = written["llama"]
    changed = rewritten(directory / "adapter", tmp_path, **changes)
    base = TransformerLM.from_huggingface(directory / "base")
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(base, changed)


def test_an_adapter_for_another_vocabulary_or_model_is_refused(written):
    llama, _ = written["llama"]
    gemma, _ = written["gemma-tied"]
    config = json.loads((llama / "base" / "config.json").read_text())
    smaller = TransformerLM(
        eqx_embed.huggingface.config_from_huggingface({**config, "vocab_size": 48}),
        key=jax.random.key(0),
    )
    expected = r"embed_tokens.weight has shape \(64, 32\), .* has \(48, 32\)"
    with pytest.raises(ValueError, match=expected):
        load_peft_adapter(smaller, llama / "adapter")
    gpt2 = TransformerLM.from_huggingface(written["gpt2"][0] / "base")
    with pytest.raises(ValueError, match="model is GPT2LMHeadModel"):
        load_peft_adapter(gpt2, gemma / "adapter")
