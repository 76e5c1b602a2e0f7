"""Per-device memory of the lookup, the decode and the fused loss with gradients, with
the vocabulary split over 8 devices against one device (XLA's `memory_analysis()` of
the compiled programs, compile only), and the collectives each program compiles to.

Goals: the table's bytes per device at most 1/8 of one device's, and the loss's
temporaries per device at most 1/4 of one device's. A missed goal prints as MISSED.

    python benchmarks/bench_sharding.py

It needs 8 devices; on fewer it runs itself again with 8 CPU devices
(`--xla_force_host_platform_device_count=8`) in a subprocess.
"""

import json
import os
import re
import subprocess
import sys

DEVICES = 8
TOKENS, WIDTH, VOCAB = 8192, 2048, 128256
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")


def measure() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import eqx_embed

    def programs(table, hidden, ids, targets):
        def decoder(weight):
            return eqx_embed.EmbeddingDecode(eqx_embed.Embedding(weight=weight))

        def lookup(weight, ids):
            return jax.vmap(eqx_embed.Embedding(weight=weight))(ids)

        def decode(weight, hidden):
            return jax.vmap(decoder(weight))(hidden)

        def loss(weight, hidden, targets):
            return jnp.mean(decoder(weight).cross_entropy(hidden, targets))

        return dict(
            lookup=(lookup, (table, ids)),
            decode=(decode, (table, hidden)),
            loss_and_grads=(
                jax.value_and_grad(loss, argnums=(0, 1)),
                (table, hidden, targets),
            ),
        )

    def compile_all(sharding=None):
        def shape(shape, dtype, spec):
            placed = None if sharding is None else NamedSharding(sharding, spec)
            return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

        table = shape((VOCAB, WIDTH), jnp.bfloat16, P("vocab", None))
        hidden = shape((TOKENS, WIDTH), jnp.bfloat16, P())
        ids = shape((TOKENS,), jnp.int32, P())
        results = {}
        for name, (function, args) in programs(table, hidden, ids, ids).items():
            compiled = jax.jit(function).lower(*args).compile()
            memory = compiled.memory_analysis()
            text = compiled.as_text()
            results[name] = dict(
                argument_bytes=memory.argument_size_in_bytes,
                temp_bytes=memory.temp_size_in_bytes,
                collectives={
                    kind: len(re.findall(rf" {kind}(?:-start)?\(", text))
                    for kind in COLLECTIVES
                },
            )
        per_device_rows = VOCAB if sharding is None else VOCAB // DEVICES
        return dict(programs=results, table_bytes=per_device_rows * WIDTH * 2)

    one = compile_all()
    mesh = jax.make_mesh((DEVICES,), ("vocab",))
    with jax.set_mesh(mesh):
        split = compile_all(mesh)
    return dict(one=one, split=split)


def measure_in_subprocess() -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
        JAX_PLATFORMS="cpu",
    )
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "import bench_sharding; print(json.dumps(bench_sharding.measure()))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", code, here],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> list:
    import jax
    from _harness import Row, check_goal, machine_description

    print(machine_description())
    figures = measure() if jax.device_count() >= DEVICES else measure_in_subprocess()
    one, split = figures["one"], figures["split"]
    label = f"{TOKENS} x {WIDTH} x {VOCAB} bfloat16"
    print(f"\nper-device MiB, {label}, vocabulary over {DEVICES} devices vs one")
    print(f"  {'program':<16} {'args 1':>9} {'args 8':>9} {'temp 1':>9} {'temp 8':>9}")
    rows = []
    for name, single in one["programs"].items():
        sharded = split["programs"][name]
        mib = {k: v / 2**20 for k, v in sharded.items() if k.endswith("bytes")}
        base = {k: v / 2**20 for k, v in single.items() if k.endswith("bytes")}
        print(
            f"  {name:<16} {base['argument_bytes']:9.0f} {mib['argument_bytes']:9.0f} "
            f"{base['temp_bytes']:9.0f} {mib['temp_bytes']:9.0f}"
        )
        collectives = ", ".join(
            f"{count} {kind}" for kind, count in sharded["collectives"].items() if count
        )
        print(f"  {'':<16} collectives on {DEVICES} devices: {collectives or 'none'}")
        for kind in ("argument_bytes", "temp_bytes"):
            case = f"{name} {kind.split('_')[0]} {label}"
            rows.append(Row("sharding_mib", case + " 1 device", base[kind], 1.0, "1"))
            ratio = mib[kind] / base[kind] if base[kind] else float("nan")
            rows.append(
                Row("sharding_mib", case + f" {DEVICES} devices", mib[kind], ratio, "1")
            )
    table_ratio = split["table_bytes"] / one["table_bytes"]
    loss_ratio = (
        split["programs"]["loss_and_grads"]["temp_bytes"]
        / one["programs"]["loss_and_grads"]["temp_bytes"]
    )
    for goal, ratio, limit in (
        ("table bytes per device", table_ratio, 1 / DEVICES),
        ("loss + grads temporaries per device", loss_ratio, 1 / 4),
    ):
        rows.append(
            check_goal(
                f"{goal} on {DEVICES} devices / on one, {label}",
                ratio,
                limit,
                source="issue 9",
                unit="",
            )
        )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
