"""The package layout's one-way dependencies, read from the source's imports:
`nn` imports neither `models` nor `huggingface`, and `models` imports `huggingface`
only inside functions (lazily), never when it is imported."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "eqx_embed"


def imported_packages(
    source: str, package: tuple[str, ...], *, module_level_only: bool
) -> set[str]:
    """The `eqx_embed` subpackages (`"nn"`, `"models"`, ...) that a module of
    `package` (such as `("eqx_embed", "nn")`) imports."""
    tree = ast.parse(source)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = (*base, *(node.module or "").split("."))
                names = [alias.name for alias in node.names]
            else:
                parts = tuple((node.module or "").split("."))
                names = [alias.name for alias in node.names]
            parts = tuple(part for part in parts if part)
            if parts[:1] != ("eqx_embed",):
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "eqx_embed" and len(parts) > 1:
                    found.add(parts[1])
    return found


def modules(subpackage: str) -> list[pathlib.Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def imports_of(path: pathlib.Path, *, module_level_only: bool) -> set[str]:
    package = path.relative_to(PACKAGE.parent).parent.parts
    return imported_packages(
        path.read_text(), package, module_level_only=module_level_only
    )


def test_the_subpackages_exist():
    for subpackage in ("nn", "models", "models/families", "huggingface"):
        assert modules(subpackage), subpackage


@pytest.mark.parametrize("path", modules("nn"), ids=lambda p: p.name)
def test_nn_imports_neither_models_nor_huggingface(path):
    found = imports_of(path, module_level_only=False)
    assert not found & {"models", "huggingface"}, (path, found)


@pytest.mark.parametrize("path", modules("models"), ids=lambda p: p.name)
def test_models_import_huggingface_only_lazily(path):
    found = imports_of(path, module_level_only=True)
    assert "huggingface" not in found, (path, found)


def test_the_checker_sees_forbidden_imports():
    """The checker itself, on relative, absolute and function-level imports."""
    nn = ("eqx_embed", "nn")
    relative = "from ..models import TransformerLM\n"
    assert imported_packages(relative, nn, module_level_only=True) == {"models"}
    assert imported_packages(
        "from .. import huggingface\n", nn, module_level_only=True
    ) == {"huggingface"}
    lazy = "def f():\n    import eqx_embed.huggingface\n"
    assert imported_packages(lazy, nn, module_level_only=True) == set()
    assert imported_packages(lazy, nn, module_level_only=False) == {"huggingface"}
    sibling = "from ._indices import check_indices\n"
    assert imported_packages(sibling, nn, module_level_only=False) == {"nn"}
