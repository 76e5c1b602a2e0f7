"""Every public entry point that takes integers, fed the integers an attack feeds it.

One table, `ROWS`, lists each (entry point, integer argument) of the public API, with
how to call it and what a bad value must give. Each row is fed:

- an int64 value past int32 (`2**32 + 3`, which an int32 cast would wrap onto the
    valid 3), eagerly as a NumPy array, and traced (under `jax_enable_x64`, the only
    way a traced int64 exists) through `eqx.filter_jit` and `jax.vmap`;
- a negative value out of range, where negatives are out of range;
- floats, where integers are expected.

A bad value must raise, or read NaNs, as the row's policy says; never wrap. The
reference each time is the same call on the good value: it must neither raise nor
read NaNs, so that what the bad value gives is the bad value's doing.

`test_the_table_covers_every_public_integer_argument` reads the signatures of the
whole public API: a new entry point whose annotations take an integer array fails it
until it has a row here (or a reason, in `NOT_ENTRY_POINTS`). To add a case for every
row (NaN-producing ids in a prompt's padding, say), add a test over `ROWS`; to add an
entry point, add a `Row`.
"""

import collections.abc
import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import eqx_embed

VOCAB = 16
WIDTH = 8
POSITIONS = 8
WIDE = 2**32 + 3  # int32 would wrap it onto 3, a valid id, position and length
WIDE_NEGATIVE = -(2**31) - 1  # int32 would wrap it onto 2**31 - 1
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    intermediate_size=16,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=POSITIONS,
)


class Subjects:
    """The modules of one `out_of_range` policy, built once; both policies share the
    same weights."""

    def __init__(self, policy: str, cache: eqx_embed.KVCache | None = None):
        key = jax.random.key(0)
        table = np.random.default_rng(0).normal(size=(VOCAB, WIDTH))
        table = jnp.asarray(table, jnp.float32)
        self.embedding = eqx_embed.Embedding(weight=table, out_of_range=policy)
        # Padding at 3: the row an int32 cast of `WIDE` would read.
        self.padded = eqx_embed.Embedding(weight=table, padding_idx=3)
        self.decoder = eqx_embed.EmbeddingDecode(self.embedding)
        self.reversible = eqx_embed.ReversibleEmbedding(
            weight=table, out_of_range=policy
        )
        self.position = eqx_embed.PositionEmbedding(
            POSITIONS, WIDTH, key=key, out_of_range=policy
        )
        self.sinusoidal = eqx_embed.SinusoidalPositionalEncoding(
            WIDTH, max_seq_len=POSITIONS, out_of_range=policy
        )
        self.rope = eqx_embed.RotaryPositionalEmbedding(
            WIDTH, max_seq_len=POSITIONS, out_of_range=policy
        )
        config = eqx_embed.TransformerConfig("llama", **CONFIG, out_of_range=policy)
        self.model = eqx_embed.TransformerLM(config, key=key)
        if cache is None:
            cache = self.model.prefill(np.array([[1, 2]]), capacity=4)[1]
        self.cache = cache  # the same weights' under either policy
        self.hidden = jnp.asarray(
            np.random.default_rng(1).normal(size=(3, WIDTH)), jnp.float32
        )
        self.mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def subjects() -> dict[str, Subjects]:
    lenient = Subjects("nan")
    return dict(nan=lenient, error=Subjects("error", cache=lenient.cache))


def reads_nan(result: Any) -> bool:
    """Whether a bad value showed: NaNs in a float result."""
    return any(
        bool(np.isnan(np.asarray(leaf, np.float64)).any())
        for leaf in jax.tree.leaves(result)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    )


def all_true(result: Any) -> bool:
    """`Embedding.mask`: a bad id is never padding."""
    return bool(np.asarray(result).all())


@dataclasses.dataclass(frozen=True)
class Row:
    """One integer argument of one public entry point.

    - `call(subjects, value)`: the entry point, with `value` for the argument.
    - `good`: a valid value; `slot` is where a bad value replaces one of its entries.
    - `policy`: what a bad value known at the call gives: `"policy"` (the module's
        `out_of_range`: NaNs, `poisoned`, or a `ValueError`), `"raise"` (a
        `ValueError` under both policies) or `"never"` (`poisoned`, under both).
    - `message`: what the `ValueError` says, before the bad value.
    - `negative`: a negative value out of range (`None`: negatives are valid).
    - `traced`: whether a traced bad value is checked when the program runs (it
        then follows the policy); `per_sequence`: whether `jax.vmap` maps it.
    - `poisoned`: how a bad value shows in the result; `None` where another test
        owns it (generation's NaN logits).
    """

    entry: str
    argument: str
    call: Callable[[Subjects, Any], Any]
    good: Any
    message: str
    slot: tuple[int, ...] = (1,)
    policy: str = "policy"
    negative: int | None = -(VOCAB + 1)
    traced: bool = True
    per_sequence: bool = True
    floats_refused: bool = True
    poisoned: Callable[[Any], bool] | None = reads_nan

    @property
    def id(self) -> str:
        return f"{self.entry}-{self.argument}"


TOKENS = np.array([1, 2, 5], np.int64)
BATCH = TOKENS[None]
LM = "TransformerLM"


def _lm(method: str, argument: str, *, batch: bool = False, **row: Any) -> Row:
    """A row for `TransformerLM.<method>`, the other arguments valid."""
    good = BATCH if batch else TOKENS

    def call(s: Subjects, value: Any) -> Any:
        arguments: dict[str, Any] = dict(tokens=good)
        if method in ("loss", "mean_loss", "score"):
            arguments["targets" if method != "score" else "next_tokens"] = good
        arguments[argument] = value
        return getattr(s.model, method)(**arguments)

    return Row(
        f"{LM}.{method}",
        argument,
        call,
        good,
        slot=(0, 1) if batch else (1,),
        per_sequence=not batch,
        **row,
    )


def _lm_rows(method: str, *, batch: bool = False) -> list[Row]:
    """Tokens, targets, positions and segment ids of one method."""
    rows = [_lm(method, "tokens", batch=batch, message="token id")]
    target = dict(loss="targets", mean_loss="targets", score="next_tokens")
    if method in target:
        rows.append(
            _lm(method, target[method], batch=batch, message="target", negative=-1)
        )
    positions = np.arange(3)[None] if batch else np.arange(3)
    segments = np.zeros_like(positions)
    rows += [
        dataclasses.replace(
            _lm(method, "token_positions", batch=batch, message="position"),
            good=positions,
            negative=-1,
            # Known at the call, a position always raises, as the RoPE's.
            policy="raise",
        ),
        dataclasses.replace(
            _lm(method, "segment_ids", batch=batch, message="segment_ids"),
            good=segments,
            negative=WIDE_NEGATIVE,
            policy="raise",
            # Any int is a valid segment id; traced ones are already JAX integers,
            # which nothing narrows further.
            traced=False,
        ),
    ]
    return rows


def _loss_row(owner: str, method: str) -> Row:
    """A fused loss's targets: `EmbeddingDecode`'s, or `ReversibleEmbedding`'s."""

    def call(s: Subjects, targets: Any) -> Any:
        module = s.decoder if owner == "EmbeddingDecode" else s.reversible
        return getattr(module, method)(s.hidden, targets)

    return Row(
        f"{owner}.{method}",
        "targets",
        call,
        TOKENS,
        "target",
        negative=-1,
        # The mean is of a whole batch, not to be vmapped (its documentation).
        per_sequence=method == "cross_entropy",
    )


def _generate(s: Subjects, prompts: Any, **options: Any) -> Any:
    return s.model.generate(prompts, max_new_tokens=2, **options)


ROWS = [
    Row(
        "Embedding.__call__",
        "token",
        lambda s, v: s.embedding(v),
        np.int64(7),
        "token id",
        slot=(),
    ),
    Row(
        "Embedding.mask",
        "tokens",
        lambda s, v: s.padded.mask(v),
        TOKENS,
        "token id",
        policy="never",
        poisoned=all_true,
    ),
    Row(
        "ReversibleEmbedding.__call__",
        "token",
        lambda s, v: s.reversible(v),
        np.int64(7),
        "token id",
        slot=(),
    ),
    *(
        _loss_row(owner, method)
        for owner in ("EmbeddingDecode", "ReversibleEmbedding")
        for method in ("cross_entropy", "mean_cross_entropy")
    ),
    Row(
        "PositionEmbedding.__call__",
        "position",
        lambda s, v: s.position(v),
        np.int64(2),
        "position",
        slot=(),
        negative=-1,
    ),
    Row(
        "SinusoidalPositionalEncoding.__call__",
        "position",
        lambda s, v: s.sinusoidal(v),
        np.int64(2),
        "position",
        slot=(),
        negative=-1,
    ),
    Row(
        "RotaryPositionalEmbedding.__call__",
        "positions",
        lambda s, v: s.rope(s.hidden, positions=v),
        np.arange(3),
        "position",
        negative=-1,
        policy="raise",
    ),
    Row(
        "RotaryPositionalEmbedding.rotation",
        "positions",
        lambda s, v: s.rope.rotation(3, positions=v)(s.hidden),
        np.arange(3),
        "position",
        negative=-1,
        policy="raise",
    ),
    *_lm_rows("__call__"),
    *_lm_rows("hidden_states"),
    *_lm_rows("loss"),
    *_lm_rows("score"),
    *_lm_rows("mean_loss", batch=True),
    Row(
        f"{LM}.prefill",
        "prompts",
        lambda s, v: s.model.prefill(v, capacity=4)[0],
        BATCH,
        "token id",
        slot=(0, 1),
        per_sequence=False,
    ),
    Row(
        f"{LM}.prefill",
        "prompt_lengths",
        lambda s, v: s.model.prefill(BATCH, prompt_lengths=v, capacity=4)[0],
        np.array([2]),
        "prompt_lengths",
        slot=(0,),
        policy="raise",
        negative=0,
        traced=False,  # traced lengths: the generation tests'
        per_sequence=False,
    ),
    Row(
        f"{LM}.decode_step",
        "tokens",
        lambda s, v: s.model.decode_step(s.cache, v)[0],
        np.array([4]),
        "token id",
        slot=(0,),
        per_sequence=False,
    ),
    Row(
        f"{LM}.generate",
        "prompts",
        lambda s, v: _generate(s, v),
        BATCH,
        "token id",
        slot=(0, 1),
        per_sequence=False,
        poisoned=None,  # what NaN logits generate: the generation tests'
    ),
    Row(
        f"{LM}.generate",
        "prompt_lengths",
        lambda s, v: _generate(s, BATCH, prompt_lengths=v),
        np.array([2]),
        "prompt_lengths",
        slot=(0,),
        policy="raise",
        negative=0,
        traced=False,
        per_sequence=False,
        poisoned=None,
    ),
    Row(
        f"{LM}.generate",
        "eos_token_id",
        # Typed as a Python int (or a sequence of them), which nothing narrows.
        lambda s, v: _generate(s, BATCH, eos_token_id=int(v)),
        np.int64(2),
        "eos_token_id",
        slot=(),
        policy="raise",
        negative=-1,
        traced=False,  # a Python int, never traced
        per_sequence=False,
        floats_refused=False,  # `int(v)` above
        poisoned=None,
    ),
    Row(
        "shard_batch",
        "batch",
        lambda s, v: eqx_embed.shard_batch(
            v, s.mesh, eqx_embed.sharding_rules(data="data")
        ),
        TOKENS[None],
        "batch",
        slot=(0, 1),
        policy="raise",
        negative=WIDE_NEGATIVE,
        traced=False,  # JAX arrays are placed as they are: nothing narrows them
        per_sequence=False,
        floats_refused=False,  # a batch holds floats too
    ),
]

# Integer arguments of the public API that are not entry points for ids.
NOT_ENTRY_POINTS = {
    # Built by `prefill` and `decode_step`, whose lengths are int32 JAX arrays.
    ("KVCache.__init__", "lengths"): "the cache's own lengths",
    # The table-kind interface: `Embedding` checks the ids before its kind reads them.
    ("TableKind.gather", "ids"): "ids checked by the embedding that holds the kind",
    ("QuantizedTable.gather", "ids"): "ids checked by the embedding that holds it",
    # Quantized data, made by `quantize`: integers, not ids.
    ("QuantizedTable.__init__", "values"): "the quantized integers themselves",
    ("QuantizedTable.__init__", "zero"): "int4's zero points",
    # Python ints, compared as Python ints (nothing narrows them): the test below.
    ("TransformerLM.generate", "stop_sequences"): "test_python_int_ids_never_wrap",
    ("GenerationConfig.__init__", "eos_token_id"): "test_python_int_ids_never_wrap",
}


@pytest.mark.parametrize(
    "argument", ["stop_sequences", "eos_token_id", "pad_token_id", "defaults"]
)
def test_python_int_ids_never_wrap(subjects, argument):
    """Ids given as Python or NumPy ints, not arrays: `WIDE` is refused by name
    (int32 would make it the valid id 3), as is a negative one (a NumPy int by the
    annotations, which take Python ints)."""
    model = subjects["nan"].model
    for bad in (WIDE, np.int64(WIDE), -1):
        if argument == "stop_sequences":
            options = dict(stop_sequences=[[1, bad]])
        elif argument == "defaults":
            config = eqx_embed.GenerationConfig(eos_token_id=[2, bad])
            model = eqx_embed.TransformerLM(
                model.config, generation_config=config, **model.parts()
            )
            options, argument = {}, "eos_token_id"
        else:
            options = {argument: bad}
        with pytest.raises((ValueError, TypeCheckError), match=argument):
            model.generate(np.array([[1, 2]]), max_new_tokens=2, **options)


def with_value(good: Any, slot: tuple[int, ...], value: int) -> np.ndarray:
    """`good` as an int64 NumPy array with `value` at `slot`."""
    array = np.array(good, np.int64)
    array[slot] = value
    return array


def _is_key(annotation: Any) -> bool:
    return "prng_key" in getattr(annotation, "dtypes", ())


def _takes_integer_arrays(annotation: Any) -> bool:
    """Whether a parameter's annotation admits an integer array or a sequence of
    ints (a PRNG key, stored as unsigned integers, is not one)."""
    arguments = typing.get_args(annotation)
    if any(_is_key(argument) for argument in arguments):
        return False
    dtypes = getattr(annotation, "dtypes", None)
    if dtypes is not None:
        return all("int" in dtype for dtype in dtypes)
    if typing.get_origin(annotation) is collections.abc.Sequence:
        (item,) = typing.get_args(annotation)
        return bool({int, np.integer} & {item, *typing.get_args(item)})
    return any(_takes_integer_arrays(argument) for argument in arguments)


def _public_callables() -> dict[str, Callable]:
    """Every public function of `eqx_embed`, and every public method (constructors
    and `__call__` included) of its public classes."""
    found: dict[str, Callable] = {}
    for name in dir(eqx_embed):
        value = getattr(eqx_embed, name)
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if inspect.isfunction(value):
            found[name] = value
        elif inspect.isclass(value):
            own = [
                klass for klass in value.__mro__ if klass.__module__.startswith("eqx_")
            ]
            for attribute in {a for klass in own for a in vars(klass)}:
                if attribute.startswith("_") and attribute not in (
                    "__init__",
                    "__call__",
                ):
                    continue
                member = inspect.getattr_static(value, attribute)
                if isinstance(member, classmethod | staticmethod):
                    member = member.__func__
                if inspect.isfunction(member):
                    found[f"{name}.{attribute}"] = member
    return found


def test_the_table_covers_every_public_integer_argument():
    callables = _public_callables()
    annotated = {
        (entry, parameter.name)
        for entry, function in callables.items()
        for parameter in inspect.signature(function).parameters.values()
        if _takes_integer_arrays(parameter.annotation)
    }
    rows = {(row.entry, row.argument) for row in ROWS}
    assert annotated - rows - set(NOT_ENTRY_POINTS) == set()
    # And the rows name real arguments: `shard_batch`'s batch is typed `Any`.
    for entry, argument in rows:
        assert argument in inspect.signature(callables[entry]).parameters, entry
    assert ("TransformerLM.mean_loss", "segment_ids") in annotated


def _raises(row: Row, policy: str) -> bool:
    return row.policy == "raise" or (row.policy == "policy" and policy == "error")


def _check_bad(row: Row, subjects: Subjects, policy: str, bad: np.ndarray) -> None:
    value = int(bad[row.slot])
    if _raises(row, policy):
        with pytest.raises(ValueError, match=rf"{row.message}.*{value}"):
            row.call(subjects, bad)
    elif row.poisoned is not None:
        assert row.poisoned(row.call(subjects, bad))


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_good_values_read_no_nan(subjects, row):
    """The reference: what the bad values give below is theirs alone."""
    result = row.call(subjects["error"], np.array(row.good, np.int64))
    assert not reads_nan(result)


@pytest.mark.parametrize("policy", ["nan", "error"])
@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_wide_int64_values_never_wrap(subjects, row, policy):
    _check_bad(row, subjects[policy], policy, with_value(row.good, row.slot, WIDE))


@pytest.mark.parametrize("policy", ["nan", "error"])
@pytest.mark.parametrize(
    "row", [row for row in ROWS if row.negative is not None], ids=lambda row: row.id
)
def test_negative_values_out_of_range(subjects, row, policy):
    _check_bad(
        row, subjects[policy], policy, with_value(row.good, row.slot, row.negative)
    )


@pytest.mark.parametrize(
    "row", [row for row in ROWS if row.floats_refused], ids=lambda row: row.id
)
def test_floats_are_refused(subjects, row):
    floats = np.asarray(row.good, np.float32)
    # jaxtyping's `TypeCheckError` (a `TypeError`) or a `ValueError`, naming it.
    naming = rf"(?s){row.argument}|{row.message}|integer"
    with pytest.raises((ValueError, TypeError), match=naming):
        row.call(subjects["nan"], floats)


@pytest.mark.parametrize("policy", ["nan", "error"])
@pytest.mark.parametrize(
    "row", [row for row in ROWS if row.traced], ids=lambda row: row.id
)
def test_traced_wide_int64_values_never_wrap(subjects, row, policy):
    """Under `eqx.filter_jit`, and `jax.vmap` inside it where the entry point takes
    one sequence (or one id): the bad value is the second of a batch of two."""
    subject = subjects[policy]
    bad = with_value(row.good, row.slot, WIDE)
    with jax.enable_x64(True):
        traced = jnp.asarray(bad)  # int64: the only way a wide id is ever traced
        if row.per_sequence:
            batch = jnp.stack([jnp.asarray(row.good, jnp.int64), traced])
            mapped = eqx.filter_jit(
                lambda v: jax.vmap(lambda one: row.call(subject, one))(v)
            )
            run = lambda: mapped(batch)  # noqa: E731
        else:
            run = lambda: eqx.filter_jit(row.call)(subject, traced)  # noqa: E731
        if policy == "error" and row.policy != "never":
            with pytest.raises(RuntimeError, match=rf"{row.message} {WIDE} is out"):
                jax.block_until_ready(run())
        elif row.poisoned is not None:
            assert row.poisoned(run())
