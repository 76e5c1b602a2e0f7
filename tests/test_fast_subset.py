"""`.ci/fast_tests.py`, the subset that CI runs on the lowest and the newest supported
versions: the nn and models test modules that import no peer oracle."""

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "fast_tests", ROOT / ".ci" / "fast_tests.py"
)
fast_tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fast_tests)

# Read as text here, independently of the script's syntax tree.
PEER_IMPORT = re.compile(
    r"^\s*(?:import|from)\s+(?:flax|keras|penzai|torch|transformers)\b", re.MULTILINE
)


def test_the_subset_is_every_nn_and_models_module_without_a_peer():
    listed = set(fast_tests.fast_test_modules())
    for folder in ("tests/nn", "tests/models"):
        modules = sorted((ROOT / folder).glob("test_*.py"))
        assert modules
        for path in modules:
            name = str(path.relative_to(ROOT))
            uses_peer = bool(PEER_IMPORT.search(path.read_text()))
            assert (name in listed) is not uses_peer, name
    assert all(name.startswith(("tests/nn/", "tests/models/")) for name in listed)


def test_an_import_anywhere_in_a_module_takes_it_out(tmp_path):
    for folder in ("tests/nn", "tests/models"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "tests/nn/test_plain.py").write_text("import numpy as np\n")
    (tmp_path / "tests/nn/test_nested.py").write_text(
        "def test_x():\n    import torch.nn.functional as F\n"
    )
    (tmp_path / "tests/models/test_from.py").write_text(
        "from flax.linen import Embed\n"
    )
    (tmp_path / "tests/models/test_lookalike.py").write_text("import kerasish\n")
    (tmp_path / "tests/models/helper.py").write_text("x = 1\n")
    assert fast_tests.fast_test_modules(tmp_path) == [
        "tests/nn/test_plain.py",
        "tests/models/test_lookalike.py",
    ]
