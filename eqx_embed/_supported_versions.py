"""The Python and JAX that this package supports, checked when it is imported: an
unsupported one fails here with one clear `ImportError`, rather than with an
`AttributeError` from deep inside a JAX call later. `pyproject.toml` declares the same
floors (`tests/test_supported_versions.py` holds them equal)."""

import re
import sys

# JAX 0.6.2, the last JAX for Python 3.10, lacks the explicit-sharding API used here
# (`jax.set_mesh`, `jax.P`, `jax.sharding.reshard`).
LOWEST_PYTHON = (3, 11)
# The first JAX whose abstract arrays have `.mat` (`.vma` before), which the
# vocabulary-parallel loss reads.
LOWEST_JAX = (0, 10, 0)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _release(version: str) -> tuple[int, ...]:
    """`(0, 8, 2)` from "0.8.2", "0.9.0.1" or "0.10.3.dev20260101"."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ImportError(f"eqx_embed cannot read the JAX version {version!r}.")
    return tuple(int(part) for part in match.group().split("."))


def check_python(version: tuple[int | str, ...]) -> None:
    """Raises `ImportError` unless `version` (as `sys.version_info`) is supported."""
    if tuple(version[:2]) < LOWEST_PYTHON:
        raise ImportError(
            f"eqx_embed supports Python {_dotted(LOWEST_PYTHON)} or later; this is "
            f"Python {'.'.join(map(str, version[:3]))}."
        )


def check_jax(version: str) -> None:
    """Raises `ImportError` unless `version` (as `jax.__version__`) is supported."""
    if _release(version) < LOWEST_JAX:
        raise ImportError(
            f"eqx_embed supports JAX {_dotted(LOWEST_JAX)} or later; found jax "
            f"{version}. Upgrade it: pip install -U jax"
        )


check_python(sys.version_info)
# Only once Python is known to be supported: JAX itself may not import on an older one.
import jax  # noqa: E402

check_jax(jax.__version__)
