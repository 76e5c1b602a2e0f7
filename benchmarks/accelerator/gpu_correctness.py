"""The GPU check's correctness half: each item computed on the default device (the
GPU, or the CPU in a smoke run) and compared on the host with a float64 NumPy
reference.

The references: rows of the table and `hidden @ table.T` for the lookup and the
decode; for the rest the test suite's own, imported rather than copied (from test
modules that need no peer beyond what the GPU machine has):
`tests/nn/test_cross_entropy.py`'s `reference` (losses and both gradients from the
softmax formula, not from autodiff), `tests/nn/test_rope.py`'s `reference_rope`, and
`tests/models/test_transformer.py`'s `reference_logits` (a plain NumPy transformer).
Tolerances come from `tests/_tolerances.py`.

float32 items run at `jax.default_matmul_precision("highest")`: a GPU's default
float32 matmul is TF32 (10 mantissa bits), for which no float32 bound holds.
bfloat16 items accumulate in float32, so their bound is float32 accumulation plus a
few bfloat16 roundings.
"""

import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[2] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "nn"), str(TESTS / "models")]

from _tolerances import tolerance  # noqa: E402
from test_cross_entropy import reference as reference_loss  # noqa: E402
from test_rope import close as rope_tolerance, reference_rope  # noqa: E402
from test_transformer import reference_logits as reference_model  # noqa: E402

import eqx_embed  # noqa: E402

DTYPES = (jnp.float32, jnp.bfloat16)
# Several vocabulary blocks of the fused loss's default 2048 rows, the last partial.
TOKENS, WIDTH, VOCAB = 128, 64, 4500
BATCH, HEADS, HEAD_DIM = 2, 4, 32


def llama_config(vocab, width, inner, layers, heads, kv_heads, positions):
    """A tied Llama (tied, so that `benchmarks/bench_transformer.py`'s `equinox.nn`
    twin, which ties with `eqx.nn.Shared`, can hold its weights)."""
    return eqx_embed.TransformerConfig(
        family="llama",
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
    )


MODEL = llama_config(64, 32, 48, 2, 4, 2, 32)
SEQ, PROMPT, NEW_TOKENS = 16, 8, 8


@dataclass
class Check:
    """One correctness item: whether every element is within its tolerance, and the
    worst element's error as a fraction of what it was allowed."""

    item: str
    passed: bool
    detail: str


def compare(item: str, got, expected, *, rtol: float, atol: float) -> Check:
    """`got` against the float64 `expected`, element by element; NaN never passes,
    and a zero tolerance asks for equality."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return Check(item, False, f"shape {got.shape}, expected {expected.shape}")
    error = np.abs(got - expected)
    allowed = atol + rtol * np.abs(expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(
            allowed > 0, error / allowed, np.where(error > 0, np.inf, 0)
        )
    worst = float(np.max(np.nan_to_num(fraction, nan=np.inf), initial=0.0))
    return Check(
        item,
        worst <= 1.0,
        f"largest error {float(np.max(error, initial=0.0)):.3g}, "
        f"{worst:.3g} of the tolerance",
    )


def summed(*tolerances: dict[str, float]) -> dict[str, float]:
    """Independent error sources add up."""
    return {bound: sum(t[bound] for t in tolerances) for bound in ("rtol", "atol")}


def accumulated(dtype, reduction: int, scale: float, *, roundings: int = 2):
    """Sums of `reduction` terms accumulated in float32, whose results are rounded
    `roundings` times to `dtype` (for float32, the same bound again)."""
    return summed(
        tolerance(np.float32, reduction, scale=scale),
        tolerance(dtype, roundings, scale=scale),
    )


def _name(dtype) -> str:
    return jnp.dtype(dtype).name


def _draw(seed: int, shape: tuple[int, ...], dtype, scale: float = 1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _product_scale(left, right) -> float:
    """`max(|left| @ |right|.T)`: the largest sum of absolute terms behind one entry
    of `left @ right.T`."""
    left, right = (np.abs(np.asarray(a, np.float64)) for a in (left, right))
    return float(np.max(left @ right.T))


def lookup_and_decode(dtype) -> list[Check]:
    table = _draw(0, (VOCAB, WIDTH), dtype)
    hidden = _draw(1, (TOKENS, WIDTH), dtype)
    ids = jax.random.randint(jax.random.key(2), (TOKENS,), 0, VOCAB)
    layer = eqx_embed.ReversibleEmbedding(weight=table)
    rows = jax.jit(lambda layer, ids: jax.vmap(layer)(ids))(layer, ids)
    logits = jax.jit(lambda layer, h: jax.vmap(layer.decode)(h))(layer, hidden)
    scale = _product_scale(hidden, table)
    table64, hidden64 = np.asarray(table, np.float64), np.asarray(hidden, np.float64)
    return [
        # A gather copies rows: equal, bit for bit.
        compare(f"lookup, {_name(dtype)}", rows, table64[ids], **summed()),
        compare(
            f"decode, {_name(dtype)}",
            logits,
            hidden64 @ table64.T,
            **accumulated(dtype, WIDTH, scale, roundings=1),
        ),
    ]


def fused_losses(dtype) -> list[Check]:
    """`cross_entropy` (mean of the per-token losses) and `mean_cross_entropy`, each
    with the gradients of the mean with respect to the table and the hidden states."""
    table = _draw(3, (VOCAB, WIDTH), dtype, 0.3)
    hidden = _draw(4, (TOKENS, WIDTH), dtype)
    targets = jax.random.randint(jax.random.key(5), (TOKENS,), 0, VOCAB)
    losses, lse, d_table, d_hidden = reference_loss(
        table, hidden, targets, weights=np.full(TOKENS, 1 / TOKENS)
    )
    # A loss's error: its logits' (dot products over the width) plus its
    # log-sum-exp's (a sum over the vocabulary, whose relative error is the log's
    # absolute one), in roundings of unit size; the mean adds a sum over the tokens.
    logit_roundings = WIDTH * _product_scale(hidden, table)
    loss_roundings = int(np.ceil(logit_roundings)) + VOCAB + 8
    # Both bounds are absolute: a loss is a difference of log-sum-exp and logit.
    loss_close = dict(rtol=0.0, atol=tolerance(np.float32, loss_roundings)["atol"])
    mean_close = dict(
        rtol=0.0,
        atol=summed(
            tolerance(np.float32, loss_roundings),
            tolerance(np.float32, TOKENS, scale=losses.max()),
        )["atol"],
    )
    # A gradient's terms |softmax - one_hot| / tokens times a table row or a hidden
    # state: each carries the loss's error, then the sum over vocabulary rows (or
    # tokens), and in bfloat16 the rounding of the softmax and of the result.
    logits = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64).T
    d_logits = (np.exp(logits - lse[:, None]) + np.eye(VOCAB)[targets]) / TOKENS
    close_table = accumulated(
        dtype, loss_roundings + TOKENS, _product_scale(d_logits.T, hidden.T)
    )
    close_hidden = accumulated(
        dtype, loss_roundings + VOCAB, _product_scale(d_logits, table.T)
    )

    def per_token(table, hidden):
        layer = eqx_embed.ReversibleEmbedding(weight=table)
        token_losses = layer.cross_entropy(hidden, targets)
        return token_losses.mean(), token_losses

    def reduced(table, hidden):
        layer = eqx_embed.ReversibleEmbedding(weight=table)
        return layer.mean_cross_entropy(hidden, targets), None

    checks = []
    for name, loss in [("cross_entropy", per_token), ("mean_cross_entropy", reduced)]:
        run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (mean, token_losses), (got_table, got_hidden) = run(table, hidden)
        label = f"{name}, {_name(dtype)}"
        if token_losses is not None:
            checks.append(
                compare(f"{label}: losses", token_losses, losses, **loss_close)
            )
        checks += [
            compare(f"{label}: mean", mean, losses.mean(), **mean_close),
            compare(f"{label}: d table", got_table, d_table, **close_table),
            compare(f"{label}: d hidden", got_hidden, d_hidden, **close_hidden),
        ]
    return checks


def rope(dtype) -> list[Check]:
    module = eqx_embed.RotaryPositionalEmbedding(HEAD_DIM, max_seq_len=TOKENS)
    x = _draw(6, (BATCH, TOKENS, HEADS, HEAD_DIM), dtype)
    got = jax.jit(lambda module, x: jax.vmap(module)(x))(module, x)
    expected = np.stack([reference_rope(row, np.arange(TOKENS)) for row in x])
    return [compare(f"RoPE, {_name(dtype)}", got, expected, **rope_tolerance(x, dtype))]


def _model_tolerance(scale: float, *, passes: int = 1, extra: int = 0):
    """An output's chain of roundings through the model (`passes` times: the
    backward pass retraces it), plus `extra`: per layer, sums over the hidden size
    (projections, norm), the sequence (attention) and the intermediate size (MLP);
    then the decode's sum over the hidden size."""
    config = MODEL
    per_layer = 3 * config.hidden_size + SEQ + config.intermediate_size
    chain = config.num_layers * per_layer + config.hidden_size
    return tolerance(np.float32, passes * chain + extra, scale=scale)


def _reference_mean_loss(parameters, static, tokens, targets) -> float:
    model = eqx.combine(parameters, static)
    losses = []
    for row, target in zip(tokens, targets, strict=True):
        logits = reference_model(model, np.asarray(row))
        top = logits.max(axis=-1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
        losses.append(lse - logits[np.arange(len(target)), target])
    return float(np.mean(losses))


def training_step() -> list[Check]:
    """A training step's loss and gradients through `model.mean_loss`: the loss
    against the NumPy model's, and the gradients along a random direction against
    the NumPy loss's central difference (float64, so that the step's float32
    rounding is all that is left)."""
    model = eqx_embed.TransformerLM(MODEL, key=jax.random.key(7))
    data = jax.random.randint(jax.random.key(8), (BATCH, SEQ + 1), 0, MODEL.vocab_size)
    tokens, targets = data[:, :-1], data[:, 1:]

    def loss_fn(model, tokens, targets):
        return model.mean_loss(tokens, targets)

    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(
        model, tokens, targets
    )

    parameters, static = eqx.partition(model, eqx.is_inexact_array)
    parameters = jax.tree.map(lambda p: np.asarray(p, np.float64), parameters)
    rng = np.random.default_rng(9)
    direction = jax.tree.map(lambda p: rng.normal(size=p.shape), parameters)
    # A unit direction, so that the difference's truncation error (step**2 times
    # third derivatives) stays far below float32's.
    norm = np.sqrt(sum(np.sum(d**2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    step = 1e-3

    def moved(sign: float):
        return jax.tree.map(lambda p, d: p + sign * step * d, parameters, direction)

    expected = _reference_mean_loss(parameters, static, tokens, targets)
    slope = (
        _reference_mean_loss(moved(1.0), static, tokens, targets)
        - _reference_mean_loss(moved(-1.0), static, tokens, targets)
    ) / (2 * step)
    products = jax.tree.leaves(
        jax.tree.map(lambda g, d: np.asarray(g, np.float64) * d, grads, direction)
    )
    along = sum(float(np.sum(p)) for p in products)
    magnitude = sum(float(np.sum(np.abs(p))) for p in products)
    return [
        compare(
            "TransformerLM training step: loss",
            loss,
            expected,
            **_model_tolerance(4.0 + abs(expected)),
        ),
        # Each parameter's gradient also sums over every token of the batch.
        compare(
            "TransformerLM training step: gradient along a random direction",
            along,
            slope,
            **_model_tolerance(magnitude, passes=2, extra=BATCH * SEQ),
        ),
    ]


def greedy_generate() -> list[Check]:
    """`generate` with `temperature=0`: each new token must be an argmax of the NumPy
    model's logits after the tokens before it, to within the logits' tolerance (a
    near-tie may go either way); the reference then continues from the GPU's token."""
    model = eqx_embed.TransformerLM(MODEL, key=jax.random.key(10))
    prompts = jax.random.randint(
        jax.random.key(11), (BATCH, PROMPT), 0, MODEL.vocab_size
    )
    new = np.asarray(model.generate(prompts, max_new_tokens=NEW_TOKENS))
    worst = 0.0
    for prompt, continuation in zip(np.asarray(prompts), new, strict=True):
        sequence = list(prompt)
        for token in continuation:
            logits = reference_model(model, np.asarray(sequence))[-1]
            close = _model_tolerance(4.0 + float(np.abs(logits).max()))
            allowed = 2 * (close["atol"] + close["rtol"] * float(np.abs(logits).max()))
            worst = max(worst, float(logits.max() - logits[token]) / allowed)
            sequence.append(int(token))
    return [
        Check(
            f"greedy generate, {NEW_TOKENS} tokens after {PROMPT}",
            worst <= 1.0,
            f"largest gap below the reference argmax: {worst:.3g} of the tolerance",
        )
    ]


def run_checks() -> list[Check]:
    """Every item, printed PASS or FAIL as it completes: the float32 ones at the
    highest matmul precision, the bfloat16 ones at the default, as they are timed."""
    items: list[tuple[Callable[..., list[Check]], tuple]] = [
        *(
            (check, (dtype,))
            for check in (lookup_and_decode, fused_losses, rope)
            for dtype in DTYPES
        ),
        (training_step, ()),
        (greedy_generate, ()),
    ]
    checks = []
    for item, arguments in items:
        in_float32 = arguments in ((), (jnp.float32,))
        precision = "highest" if in_float32 else None
        with jax.default_matmul_precision(precision):
            results = item(*arguments)
        for check in results:
            verdict = "PASS" if check.passed else "FAIL"
            print(f"  {verdict} {check.item}: {check.detail}", flush=True)
            checks.append(check)
    return checks
