"""The supported range: `pyproject.toml` declares the floors that `import eqx_embed`
checks, and an unsupported Python or JAX fails at import with one `ImportError` that
names the version found and the range supported."""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from eqx_embed import _supported_versions

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_the_floors_that_import_checks():
    lowest_python = ".".join(map(str, _supported_versions.LOWEST_PYTHON))
    assert PROJECT["requires-python"] == f">={lowest_python}"
    lowest_jax = ".".join(map(str, _supported_versions.LOWEST_JAX))
    assert f"jax>={lowest_jax},<0.12" in PROJECT["dependencies"]


def test_core_dependencies_name_plain_jax_not_a_platform_extra():
    """A `jax[cpu]` here would force the CPU extra on GPU and TPU users."""
    jax_requirements = [
        requirement
        for requirement in PROJECT["dependencies"]
        if re.match(r"jax\b(?!typing)", requirement)
    ]
    assert jax_requirements == ["jax>=0.10.0,<0.12"]


@pytest.mark.parametrize(
    "version", [(3, 10, 13, "final", 0), (3, 9, 18, "final", 0), (2, 7, 18)]
)
def test_an_older_python_is_refused_with_its_version(version):
    found = ".".join(map(str, version[:3]))
    with pytest.raises(
        ImportError,
        match=rf"^eqx_embed supports Python 3\.11 or later; this is Python {found}\.$",
    ):
        _supported_versions.check_python(version)


@pytest.mark.parametrize("version", [sys.version_info, (3, 11, 0), (3, 14, 0)])
def test_a_supported_python_passes(version):
    _supported_versions.check_python(version)


@pytest.mark.parametrize("version", ["0.9.2", "0.8.3", "0.7.2", "0.4.38"])
def test_an_older_jax_is_refused_with_its_version(version):
    with pytest.raises(
        ImportError,
        match=rf"^eqx_embed supports JAX 0\.10\.0 or later; found jax {version}\. ",
    ):
        _supported_versions.check_jax(version)


# Compared as numbers ("0.10.0" sorts before "0.9.2" as text), release part only.
@pytest.mark.parametrize(
    "version", ["0.10.0", "0.10.2", "0.10.3.dev20260101", "0.11", "1.0"]
)
def test_a_supported_jax_passes(version):
    _supported_versions.check_jax(version)


def test_an_unreadable_jax_version_is_an_import_error():
    with pytest.raises(ImportError, match="cannot read the JAX version 'unknown'"):
        _supported_versions.check_jax("unknown")


def test_import_with_an_old_jax_fails_at_once_naming_versions(tmp_path):
    """A stub `jax` package that reports 0.7.2 and has nothing else: `import
    eqx_embed` must stop at the version check, before any subpackage touches JAX."""
    stub = tmp_path / "jax"
    stub.mkdir()
    (stub / "__init__.py").write_text('__version__ = "0.7.2"\n')
    result = subprocess.run(
        [sys.executable, "-c", "import eqx_embed"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)])),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        "ImportError: eqx_embed supports JAX 0.10.0 or later; found jax 0.7.2. "
        "Upgrade it: pip install -U jax"
    ), result.stderr
    # The version check is the only frame of eqx_embed past the package itself.
    frames = re.findall(r'File "([^"]+)"', result.stderr)
    assert [pathlib.Path(f).name for f in frames if "eqx_embed" in f] == [
        "__init__.py",
        "_supported_versions.py",
        "_supported_versions.py",
    ], result.stderr
