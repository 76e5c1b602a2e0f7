"""The training example as several processes (`jax.distributed`): the options, the
mesh over all their devices, each process's share of a batch, and the check that
every process was started with the same settings."""

import argparse
import hashlib

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils

# Settings that differ from one process to the next by design.
PER_PROCESS_SETTINGS = ("process_id", "given")


def start_processes(args: argparse.Namespace):
    """Joins the run's other processes (`jax.distributed`; on CPU, collectives over
    gloo) and sets a mesh of all their devices with one `"data"` axis, which it
    returns; `None` for a run of one process."""
    if args.num_processes == 1:
        return None
    if not 0 <= args.process_id < args.num_processes:
        raise SystemExit(
            f"--process-id must be in [0, {args.num_processes}), got {args.process_id}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    jax.set_mesh(mesh)  # For the rest of the run: explicit sharding needs it.
    return mesh


def process_share(mesh, *arrays: np.ndarray):
    """Global arrays split over `mesh`'s data axis, from this process's share of the
    rows of each global array (every process computes the whole batch), or the arrays
    themselves without a mesh."""
    if mesh is None:
        return arrays
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    count, index = jax.process_count(), jax.process_index()
    shares = []
    for array in arrays:
        if len(array) % jax.device_count():
            raise SystemExit(
                f"A batch of {len(array)} rows cannot be split over "
                f"{jax.device_count()} devices: make --batch-size a multiple of it."
            )
        rows = len(array) // count
        local = array[index * rows : (index + 1) * rows]
        shares.append(jax.make_array_from_process_local_data(sharding, local))
    return tuple(shares)


def host_copies(mesh, *trees):
    """`trees` with their arrays on the host: in a run of several processes the
    model and optimiser state are replicated, so every process holds all of them."""
    if mesh is None:
        return trees
    return jax.tree.map(lambda x: np.asarray(x) if eqx.is_array(x) else x, trees)


def check_settings_agree(args: argparse.Namespace) -> None:
    """Stops every process of the run, naming the options, unless all were started
    with the same settings: a process with another `--seed` (say) would otherwise
    train its own "replicated" weights silently. Each process hashes each setting
    and the hashes are all-gathered, once, before the first step."""
    if jax.process_count() == 1:
        return
    names = sorted(set(vars(args)) - set(PER_PROCESS_SETTINGS))
    hashes = np.array(
        [
            int.from_bytes(
                hashlib.sha256(repr(getattr(args, name)).encode()).digest()[:4],
                "little",
                signed=True,
            )
            for name in names
        ],
        dtype=np.int32,
    )
    gathered = np.asarray(multihost_utils.process_allgather(hashes))
    differ = [
        name
        for name, column in zip(names, gathered.T, strict=True)
        if len(set(column)) > 1
    ]
    if differ:
        options = ", ".join("--" + name.replace("_", "-") for name in differ)
        values = ", ".join(f"{getattr(args, name)!r}" for name in differ)
        raise SystemExit(
            f"The {jax.process_count()} processes were started with different "
            f"{options} (process {jax.process_index()} has {values}): start every "
            "process with the same settings but --process-id."
        )
