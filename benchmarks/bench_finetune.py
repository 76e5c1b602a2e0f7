"""The memory of one training step (forward, backward, Adam update) of a
`TransformerLM` of 8 layers, width 512, vocabulary 32000, on 4 x 256 tokens: a full
fine-tune, LoRA of rank 8 on every linear (the base frozen) and QLoRA (the same
adapters over an int8 base). Each step is compiled from shapes alone (nothing is
allocated or run), and XLA's own figures are reported: its argument bytes (the
weights, the optimiser state, the batch) plus its temporary bytes.

Goal (issue 23, item 6): LoRA's trainable state (the gradients and both Adam moments
of what trains) at most 2% of the full fine-tune's. A missed goal prints as MISSED.

    python benchmarks/bench_finetune.py
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

FULL_SIZE = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
)
BATCH = (4, 256)
RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL = 0.02


def build(size: dict, seq_len: int, kind: str):
    """The model of `kind` (`"full"`, `"lora"`, `"qlora"`) and the filter spec of
    what trains, as shapes."""
    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", **size, max_position_embeddings=seq_len, tie_word_embeddings=True
    )

    def make():
        model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
        if kind == "qlora":
            model = eqx_embed.quantize(model, "int8")
        if kind != "full":
            model = eqx_embed.add_lora(
                model, rank=RANK, alpha=2 * RANK, targets=TARGETS, key=jax.random.key(1)
            )
        return model

    if kind == "qlora":
        # Quantization runs in NumPy, on concrete weights: built, then shapes kept.
        model = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x,
            make(),
        )
    else:
        model = eqx.filter_eval_shape(make)
    if kind == "full":  # Every float array, as `eqx.is_inexact_array` would pick.
        return model, jax.tree.map(
            lambda leaf: _is_shape(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact),
            model,
        )
    return model, eqx_embed.lora_filter(model)


def _is_shape(leaf: Any) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct)


def step_memory(model: Any, trains: Any, batch: tuple[int, int]) -> dict[str, int]:
    """The compiled step's argument and temporary bytes, and the bytes of the
    trainable state (gradients and Adam's two moments)."""
    trainable, frozen = eqx.partition(model, trains)
    frozen_arrays, static = eqx.partition(frozen, _is_shape)
    optimizer = optax.adam(1e-4)
    state = eqx.filter_eval_shape(optimizer.init, trainable)
    tokens = jax.ShapeDtypeStruct(batch, jnp.int32)

    def step(trainable, state, frozen_arrays, tokens):
        def loss(trainable):
            model = eqx.combine(trainable, frozen_arrays, static)
            return model.mean_loss(tokens[:, :-1], tokens[:, 1:])

        grads = jax.grad(loss)(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    compiled = jax.jit(step).lower(trainable, state, frozen_arrays, tokens).compile()
    memory = compiled.memory_analysis()
    trainable_bytes = sum(
        leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trainable)
    )
    return dict(
        arguments=memory.argument_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        trainable_state=3 * trainable_bytes,
    )


def main(size: dict | None = None, batch: tuple[int, int] = BATCH) -> list:
    from _harness import Row, check_goal

    size = FULL_SIZE if size is None else size
    measured = {
        kind: step_memory(*build(size, batch[1], kind), batch)
        for kind in ("full", "lora", "qlora")
    }
    names = {
        "full": "full fine-tune",
        "lora": f"LoRA rank {RANK}",
        "qlora": "QLoRA int8",
    }
    rows = []
    print("\nfinetune_step_mib  (MiB; ratio to the full fine-tune)")
    for benchmark, figure in (
        ("finetune_step_mib", lambda m: m["arguments"] + m["temporaries"]),
        ("finetune_trainable_state_mib", lambda m: m["trainable_state"]),
    ):
        base = figure(measured["full"])
        for kind, memory in measured.items():
            mib = figure(memory) / 2**20
            rows.append(
                Row(benchmark, names[kind], mib, figure(memory) / base, names["full"])
            )
            print(
                f"  {benchmark}  {names[kind]:<16} {mib:10.2f}  {rows[-1].ratio:.4f}x"
            )
    ratio = measured["lora"]["trainable_state"] / measured["full"]["trainable_state"]
    goal = check_goal(
        f"LoRA rank {RANK} trainable state / full fine-tune's",
        ratio,
        GOAL,
        source="issue 23",
    )
    return [*rows, goal]


if __name__ == "__main__":
    main()
