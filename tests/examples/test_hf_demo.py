"""`examples/hf_checkpoint.py --demo` says that its model's weights are random before it
prints a perplexity."""

import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "hf_checkpoint.py"


def test_demo_says_its_weights_are_random_before_the_perplexity(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "RANDOM, untrained weights" in output
    assert output.index("RANDOM") < output.index("perplexity:")
    assert "continuation" not in output  # it scores; it continues nothing
