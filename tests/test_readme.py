"""The README's Quickstart and example: CI runs exactly its test command, it has exactly
two commands, and its Python example runs."""

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def load_readme_commands(readme=README):
    """`.ci/readme_commands.py` as a module, reading `readme`."""
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci" / "readme_commands.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.README = readme
    return module


def test_quickstart_has_exactly_two_one_line_commands():
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^```", section, flags=re.MULTILINE)) == 4  # two blocks
    commands = load_readme_commands().quickstart_commands()
    assert set(commands) == {"main", "test"}
    for command in commands.values():
        assert "\n" not in command
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")


def test_test_command_installs_the_test_extra_and_runs_all_of_pytest():
    command = load_readme_commands().quickstart_commands()["test"]
    steps = [shlex.split(step) for step in command.split("&&")]
    assert ["pip", "install", ".[test]"] in steps
    # Bare `pytest`: the whole suite, with pyproject's options (the jaxtyping hook).
    assert steps[-1] == ["pytest"]


def test_main_command_runs_an_example_that_exists():
    command = load_readme_commands().quickstart_commands()["main"]
    steps = [shlex.split(step) for step in command.split("&&")]
    assert ["pip", "install", ".[examples]"] in steps
    program, script = steps[-1]
    assert program == "python"
    assert (ROOT / script).is_file(), script


def test_readme_commands_refuses_a_quickstart_without_two_commands(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Quickstart\n\n```bash\nmake\n```\n\n## Next\n")
    with pytest.raises(SystemExit, match="must have 2 commands, found 1"):
        load_readme_commands(readme).quickstart_commands()


def fake_project(tmp_path, test_command):
    """A copy of `.ci/` next to a README whose test command is `test_command`, a
    `ruff` that records its call, a `pip` that does nothing, and version jobs that
    record their call."""
    shutil.copytree(ROOT / ".ci", tmp_path / ".ci")
    (tmp_path / "README.md").write_text(
        "# fake\n\n## Quickstart\n\n```bash\necho main\n```\n\n"
        f"```bash\n{test_command}\n```\n\n## Example\n"
    )
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    ruff = bin_dir / "ruff"
    ruff.write_text('#!/usr/bin/env bash\necho "$@" > ruff-called\n')
    ruff.chmod(0o755)
    # A pyright that records its calls and reports a full score to --verifytypes.
    pyright = bin_dir / "pyright"
    pyright.write_text(
        '#!/usr/bin/env bash\necho "$@" >> "$CI_ROOT/pyright-called"\n'
        'if [[ "$*" == *--outputjson* ]]; then\n'
        '  score="{\\"completenessScore\\": ${SCORE:-1.0}}"\n'
        '  echo "{\\"typeCompleteness\\": $score}"\nfi\n'
    )
    pyright.chmod(0o755)
    # The support-range jobs need the real project: here they only record their call.
    (tmp_path / ".ci" / "version_jobs").write_text("touch version-jobs-ran\n")
    pip = bin_dir / "pip"
    pip.write_text("#!/usr/bin/env bash\n")
    pip.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "CI_ROOT": str(tmp_path)}


# The fake test command makes the virtual environment that .ci/run then activates.
MAKE_VENV = "mkdir -p .venv/bin && touch .venv/bin/activate"


def test_ci_runs_the_readme_test_command_then_ruff_pyright_and_versions(tmp_path):
    command = f"{MAKE_VENV} && echo \"ran 'verbatim'\" > test-command-ran"
    env = fake_project(tmp_path, command)
    result = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"+ {command}\n" in result.stdout
    assert (tmp_path / "test-command-ran").read_text() == "ran 'verbatim'\n"
    assert (tmp_path / "ruff-called").read_text() == "check .\n"
    assert (tmp_path / "pyright-called").read_text() == (
        "eqx_embed\n--verifytypes eqx_embed --ignoreexternal --outputjson\n"
    )
    assert (tmp_path / "version-jobs-ran").exists()


def test_ci_fails_below_95_percent_type_completeness(tmp_path):
    env = fake_project(tmp_path, MAKE_VENV)
    result = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        cwd=tmp_path,
        env={**env, "SCORE": "0.94"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "type completeness: 94.0%" in result.stdout
    assert not (tmp_path / "version-jobs-ran").exists()


def test_ci_fails_when_the_test_command_fails(tmp_path):
    env = fake_project(tmp_path, f"{MAKE_VENV} && false")
    result = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert not (tmp_path / "ruff-called").exists()
    assert not (tmp_path / "version-jobs-ran").exists()


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)\n```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    for block in blocks:
        namespace = {}
        exec(compile(block, str(README), "exec"), namespace)
        # Shapes promised in comments, as in `hidden = ...  # (2, 3, 64)`.
        for name, shape in re.findall(r"^(\w+) = .*# (\([\d, ]+\))$", block, re.M):
            assert str(tuple(namespace[name].shape)) == shape, name
