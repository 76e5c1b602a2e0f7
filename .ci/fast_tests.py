"""Prints the fast subset: the test modules of `tests/nn` and `tests/models` that import
no peer oracle (flax, keras, penzai, torch, transformers), one path a line. CI runs
them on the lowest and on the newest supported versions, with only the `test-fast`
extra installed. The list is read from the modules' own imports, so a test that starts
using a peer leaves the subset by itself."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_ORACLES = frozenset({"flax", "keras", "penzai", "torch", "transformers"})


def imported_packages(path: pathlib.Path) -> set[str]:
    """The top-level package of every `import` and `from ... import` in `path`."""
    packages = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            packages.add(node.module.split(".")[0])
    return packages


def fast_test_modules(root: pathlib.Path = ROOT) -> list[str]:
    return [
        str(path.relative_to(root))
        for folder in ("tests/nn", "tests/models")
        for path in sorted((root / folder).glob("test_*.py"))
        if not imported_packages(path) & PEER_ORACLES
    ]


if __name__ == "__main__":
    print("\n".join(fast_test_modules()))
