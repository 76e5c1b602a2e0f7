"""LoRA adapters in the format of Hugging Face PEFT: an adapter directory
(`adapter_config.json`, `adapter_model.safetensors`) read onto a `TransformerLM`, and
a model's adapters written as one, which `peft.PeftModel.from_pretrained` loads.

Names go through the family's checkpoint format (`_checkpoint.py`): PEFT's
`lora_A` / `lora_B` of a module are `LowRank`'s `down` / `up`, and of a table
(`lora_embedding_A` / `lora_embedding_B`) its `up.T` / `down.T`. A fused
query/key/value module (GPT-2's `c_attn`) has one `lora_A` for the three
projections: read, each gets a copy of it and its rows of `lora_B`; written, the
three become one adapter of three times the rank (their `down`s stacked, their
`up`s block-diagonal), or of the same rank when their `down`s are equal.

Tying follows PEFT: an adapter on a tied `embed_tokens` with `ensure_weight_tying`
also adapts the decode (one adapter on the one table, this library's own way);
without it, PEFT adapts the lookup only and the decode reads the base table, so the
model is loaded untied (the decode keeps the base table). `modules_to_save` (fully
trained copies of modules) replace the model's weights.
"""

import json
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..models import TransformerLM
from ..models._lora import (
    TABLE_PATHS,
    LoRALinear,
    adapted_table,
    linear_paths,
    replace_at,
    untie_decode,
    weight_shape,
    with_table_adapter,
)
from ..models._transformer_parts import named_leaves
from ..nn._lora import LoRATable, LowRank
from ._checkpoint import (
    fuse_qkv,
    huggingface_name,
    layer_names,
    split_qkv,
    top_level_name,
    transpose_conv1d,
)
from ._safetensors import read_json, read_safetensors
from .families import huggingface_family

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# adapter_config.json keys that change what the adapter computes and that this
# library does not implement: refused, by name, unless unset.
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
)


def _settings(directory: pathlib.Path, model: TransformerLM) -> dict[str, Any]:
    """`adapter_config.json`, checked: a LoRA adapter of options we implement, for
    the model's architecture."""
    file = directory / ADAPTER_CONFIG
    if not file.exists():
        raise ValueError(f"path: {directory} has no {ADAPTER_CONFIG}.")
    values = read_json(file)
    if values.get("peft_type") != "LORA":
        raise ValueError(
            f"{file}: peft_type must be 'LORA', got {values.get('peft_type')!r}."
        )
    for key in _UNSUPPORTED:
        if values.get(key):
            raise ValueError(
                f"{file}: {key}={values[key]!r} is not supported (expected it unset)."
            )
    if values.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias must be 'none', got {values['bias']!r}.")
    init = values.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        # PiSSA, OLoRA, LoftQ, EVA, CorDA... change the base weights too.
        raise ValueError(
            f"{file}: init_lora_weights={init!r} is not supported (expected true, "
            "false or 'gaussian')."
        )
    expected = huggingface_family(model.config.family).architecture
    given = (values.get("auto_mapping") or {}).get("base_model_class")
    if given is not None and given != expected:
        raise ValueError(
            f"{file}: the adapter is for {given}, but the model is {expected}."
        )
    return values


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the value of the first key
    that matches the end of `module` as a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _split_file(
    tensors: dict[str, np.ndarray], file: pathlib.Path
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The adapter's factors by role, `down` and `up`, each named as the weight it
    adapts (`module.weight`, a linear's or a table's), and the full weights
    (`modules_to_save`, embedding base layers) by name."""
    roles: dict[str, dict[str, np.ndarray]] = {"down": {}, "up": {}}
    saved = {}
    suffixes = {
        ".lora_A.weight": ("down", False),
        ".lora_B.weight": ("up", False),
        ".lora_embedding_A": ("up", True),
        ".lora_embedding_B": ("down", True),
    }
    for name, array in tensors.items():
        if not name.startswith(_PREFIX):
            raise ValueError(f"{file}: {name} does not start with {_PREFIX!r}.")
        name = name.removeprefix(_PREFIX)
        for suffix, (role, transposed) in suffixes.items():
            if name.endswith(suffix):
                weight = name.removesuffix(suffix) + ".weight"
                roles[role][weight] = array.T if transposed else array
                break
        else:
            if ".lora_" in name:
                raise ValueError(f"{file}: {name} is not a LoRA weight we support.")
            saved[name.replace(".base_layer.", ".")] = array
    return roles, saved


def _stack(
    names: list[str],
    roles: dict[str, dict[str, np.ndarray]],
    settings: dict[str, Any],
    shape: tuple[int, ...],
    path: str,
) -> LowRank | None:
    """The `LowRank` of the model's linear `path` (a `(rows, columns)` weight per
    layer, `names` its Hugging Face names), popped from `roles`; `None` when the file
    adapts none of its layers. Layers it leaves out get a zero update; layers of
    different ranks or scales are zero-padded to the largest rank, each layer's
    scale folded into its `up` (the update is the same)."""
    found = [name in roles["down"] or name in roles["up"] for name in names]
    if not any(found):
        return None
    factors = []
    for name, present in zip(names, found, strict=True):
        if not present:
            factors.append(None)
            continue
        if name not in roles["down"] or name not in roles["up"]:
            raise ValueError(f"The adapter has only one of lora_A, lora_B for {name}.")
        down, up = roles["down"].pop(name), roles["up"].pop(name)
        rank = down.shape[0]
        if up.shape != (shape[0], rank) or down.shape != (rank, shape[1]):
            raise ValueError(
                f"The adapter's lora_B, lora_A for {name} have shapes {up.shape}, "
                f"{down.shape}; the model ({path}) expects ({shape[0]}, r), "
                f"(r, {shape[1]})."
            )
        module = name.removesuffix(".weight")
        alpha = _pattern_value(
            settings.get("alpha_pattern") or {}, module, settings["lora_alpha"]
        )
        factors.append((up, down, float(alpha)))
    given = [f for f in factors if f is not None]
    ranks = {f[1].shape[0] for f in given}
    alphas = {f[2] for f in given}
    rank = max(ranks)
    uniform = len(ranks) == 1 and len(alphas) == 1 and all(found)
    ups = np.zeros((len(names), shape[0], rank), np.float32)
    downs = np.zeros((len(names), rank, shape[1]), np.float32)
    for layer, factor in enumerate(factors):
        if factor is not None:
            up, down, alpha = factor
            scale = 1.0 if uniform else alpha / down.shape[0]
            ups[layer, :, : up.shape[1]] = up * scale
            downs[layer, : down.shape[0]] = down
    alpha = given[0][2] if uniform else float(rank)
    dropout = float(settings.get("lora_dropout") or 0.0)
    return LowRank(jnp.asarray(ups), jnp.asarray(downs), alpha, dropout)


def _load_saved(
    model: TransformerLM, saved: dict[str, np.ndarray], file: pathlib.Path
) -> TransformerLM:
    """`model` with its weights replaced by the full weights the adapter saved
    (`modules_to_save`, embedding base layers), matched by Hugging Face name."""
    config = model.config
    transpose_conv1d(saved, config)
    if huggingface_family(config.family).weight_names.fused_qkv:
        split_qkv(saved, config)
    replacements: dict[str, Any] = {}
    for name, leaf in named_leaves(model.parts()).items():
        hf_names = huggingface_name(name, config)
        stacked = isinstance(hf_names, list)
        for layer, hf_name in enumerate(hf_names if stacked else [hf_names]):
            if hf_name not in saved:
                continue
            target = leaf[layer] if stacked else leaf
            array = jnp.asarray(saved.pop(hf_name), target.dtype)
            if array.shape != target.shape:
                raise ValueError(
                    f"{file}: {hf_name} has shape {array.shape}, but the model's "
                    f"{name} has {target.shape}."
                )
            leaf = leaf.at[layer].set(array) if stacked else array
            replacements[name] = leaf
    if saved:
        raise ValueError(
            f"{file}: weights for modules this model does not have: {sorted(saved)}."
        )
    return replace_at(model, replacements)


def load_peft_adapter(model: TransformerLM, path: str | pathlib.Path) -> TransformerLM:
    """`model` with the LoRA adapter that PEFT wrote to the directory `path`.

    **Arguments:**

    - `model`: a `TransformerLM` without adapters, such as
        `TransformerLM.from_huggingface` of the adapter's base model.
    - `path`: a directory with `adapter_config.json` and
        `adapter_model.safetensors`.

    **Returns:**

    The adapted model (train it with `lora_filter`, or `merge_lora` it), whose
    logits are PEFT's.

    **Raises:**

    - `ValueError`: an adapter of another type or with an option this library does
        not implement (DoRA, rsLoRA, ..., named), for another architecture, with
        modules or shapes (another vocabulary size) that the model does not have.
    """
    directory = pathlib.Path(path)
    settings = _settings(directory, model)
    file = directory / ADAPTER_WEIGHTS
    if not file.exists():
        raise ValueError(f"path: {directory} has no {ADAPTER_WEIGHTS}.")
    roles, saved = _split_file(read_safetensors(file), file)
    config = model.config
    names = huggingface_family(config.family).weight_names
    tie = config.tie_word_embeddings and bool(settings.get("ensure_weight_tying"))
    head = top_level_name(TABLE_PATHS["reverse_embedding"] + ".weight", config)
    lookup = top_level_name(TABLE_PATHS["embedding"] + ".weight", config)
    if config.tie_word_embeddings:
        # PEFT saves a tied head's adapter (and base) beside the embedding's.
        for role in ("down", "up"):
            roles[role].pop(head, None)
        saved.pop(head, None)
    untie = (
        config.tie_word_embeddings
        and not tie
        and (lookup in roles["up"] or lookup in saved)
    )
    if untie:
        # PEFT's decode reads the base table (or the original one, for a lookup in
        # modules_to_save).
        model = untie_decode(model)
    model = _load_saved(model, saved, file)
    if names.fused_qkv:
        for name in [
            n for n in roles["down"] if n.endswith(f".{names.fused_qkv}.weight")
        ]:
            down = roles["down"].pop(name)
            prefix = name.removesuffix(f"{names.fused_qkv}.weight")
            for part in ("query", "key", "value"):
                roles["down"][f"{prefix}{part}.weight"] = down
        split_qkv(roles["up"], config)
    replacements = {}
    for path, linear in linear_paths(model).items():
        hf_names = layer_names(path + ".weight", config)
        adapter = _stack(hf_names, roles, settings, weight_shape(linear)[1:], path)
        if adapter is not None:
            replacements[path] = LoRALinear(linear, _cast(adapter, linear.weight.dtype))
    model = replace_at(model, replacements)
    for target in ("embedding", "reverse_embedding"):
        table = adapted_table(model, target)
        if table is None:
            continue
        hf_name = top_level_name(TABLE_PATHS[target] + ".weight", config)
        adapter = _stack([hf_name], roles, settings, table.shape, target)
        if adapter is not None:
            adapter = LowRank(
                adapter.up[0], adapter.down[0], adapter.alpha, adapter.dropout
            )
            model = with_table_adapter(model, target, _cast(adapter, table.dtype))
    leftover = sorted(n for role in roles.values() for n in role)
    if leftover:
        raise ValueError(
            f"{file}: adapters for modules this model does not have: {leftover}."
        )
    return model


def _cast(adapter: LowRank, dtype: Any) -> LowRank:
    return LowRank(
        adapter.up.astype(dtype),
        adapter.down.astype(dtype),
        adapter.alpha,
        adapter.dropout,
    )


def _fused_qkv(
    factors: dict[str, tuple[np.ndarray, np.ndarray, float]],
    shapes: dict[str, tuple[int, ...]],
    config: Any,
) -> None:
    """Replaces, in place, the adapters of each layer's query, key and value
    projections in `factors` (module name to `(up, down, alpha)`) by one adapter
    of the family's fused module, as the module's docstring says."""
    parts = ("query", "key", "value")
    prefixes = {
        name.rsplit(".", 1)[0] for name in factors if name.rsplit(".", 1)[-1] in parts
    }
    for prefix in sorted(prefixes):
        given = [factors.pop(f"{prefix}.{part}", None) for part in parts]
        present = [g for g in given if g is not None]
        first = present[0]
        shared = len(present) == 3 and all(
            g[1].shape == first[1].shape
            and np.array_equal(g[1], first[1])
            and g[2] == first[2]
            for g in present
        )
        ups = {}
        if shared:
            down, alpha = first[1], first[2]
            for part, (up, _, _) in zip(parts, present, strict=True):
                ups[f"{prefix}.{part}.weight"] = up
        else:
            # Block-diagonal: part i reads rows `offsets[i]:` of the stacked downs,
            # each scale folded into its up (the fused adapter's scale is 1).
            ranks = [0 if g is None else g[1].shape[0] for g in given]
            rank = sum(ranks)
            downs = []
            offset = 0
            for part, factor, part_rank in zip(parts, given, ranks, strict=True):
                rows = shapes[part][0]
                up = np.zeros((rows, rank), np.float32)
                if factor is not None:
                    part_up, part_down, part_alpha = factor
                    up[:, offset : offset + part_rank] = part_up * (
                        part_alpha / part_rank
                    )
                    downs.append(part_down)
                ups[f"{prefix}.{part}.weight"] = up
                offset += part_rank
            down, alpha = np.concatenate(downs), float(rank)
        fuse_qkv(ups, config)
        ((fused_name, fused_up),) = ups.items()
        factors[fused_name.removesuffix(".weight")] = (fused_up, down, alpha)


def save_peft_adapter(model: TransformerLM, path: str | pathlib.Path) -> None:
    """Writes `model`'s LoRA adapters as a PEFT adapter directory
    (`adapter_config.json`, `adapter_model.safetensors`), which
    `peft.PeftModel.from_pretrained` loads onto the Hugging Face model that
    `to_huggingface` writes of the base, giving the same logits.

    **Arguments:**

    - `model`: a `TransformerLM` with adapters (`add_lora`, `load_peft_adapter`).
    - `path`: the directory, created if needed; the two files are replaced.

    **Raises:**

    - `ValueError`: a model without adapters.
    """
    from safetensors.numpy import save_file

    config = model.config
    names = huggingface_family(config.family).weight_names
    factors: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dropouts = set()
    for path_, linear in linear_paths(model).items():
        part = path_.rsplit(".", 1)[-1].removesuffix("_proj")
        shapes[part] = weight_shape(linear)[-2:]
        if not isinstance(linear, LoRALinear):
            continue
        adapter = linear.adapter
        dropouts.add(adapter.dropout)
        hf_names = layer_names(path_ + ".weight", config)
        for layer, hf_name in enumerate(hf_names):
            factors[hf_name.removesuffix(".weight")] = (
                np.asarray(adapter.up[layer], np.float32),
                np.asarray(adapter.down[layer], np.float32),
                adapter.alpha,
            )
    if names.fused_qkv:
        _fused_qkv(factors, shapes, config)
    tensors = {}
    for module, (up, down, _) in factors.items():
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = down
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = up
    tied_table = False
    for target in ("embedding", "reverse_embedding"):
        table = adapted_table(model, target)
        if not isinstance(table, LoRATable):
            continue
        adapter = table.adapter
        dropouts.add(adapter.dropout)
        up, down = (
            np.asarray(adapter.up, np.float32),
            np.asarray(adapter.down, np.float32),
        )
        module = top_level_name(TABLE_PATHS[target] + ".weight", config)
        module = module.removesuffix(".weight")
        factors[module] = (up, down, adapter.alpha)
        if target == "reverse_embedding":
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = down
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = up
            continue
        tensors[f"{_PREFIX}{module}.lora_embedding_A"] = np.ascontiguousarray(up.T)
        tensors[f"{_PREFIX}{module}.lora_embedding_B"] = np.ascontiguousarray(down.T)
        if model.embedding.tie_weights:
            # PEFT's tied head, the same adapter seen as a linear's.
            tied_table = True
            head = top_level_name(TABLE_PATHS["reverse_embedding"] + ".weight", config)
            head = head.removesuffix(".weight")
            tensors[f"{_PREFIX}{head}.lora_A.weight"] = down
            tensors[f"{_PREFIX}{head}.lora_B.weight"] = up
    if not factors:
        raise ValueError("model has no LoRA adapters to save (see add_lora).")
    ranks = [down.shape[0] for _, down, _ in factors.values()]
    rank = max(set(ranks), key=ranks.count)
    alphas = [alpha for (_, down, alpha) in factors.values() if down.shape[0] == rank]
    alpha = max(set(alphas), key=alphas.count)
    values = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        base_model_name_or_path=None,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=max(dropouts),
        target_modules=sorted(factors),
        rank_pattern={
            m: down.shape[0]
            for m, (_, down, _) in factors.items()
            if down.shape[0] != rank
        },
        alpha_pattern={
            m: a
            for m, (_, down, a) in factors.items()
            if a != alpha or down.shape[0] != rank
        },
        fan_in_fan_out=bool(names.transposed),
        bias="none",
        use_dora=False,
        use_rslora=False,
        init_lora_weights=True,
        ensure_weight_tying=tied_table,
        modules_to_save=None,
        inference_mode=True,
    )
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(values, indent=2) + "\n")
