"""The package layout, read from the source's imports (module-level and inside
functions alike):

- no import circle between the modules of `eqx_embed`, apart from the one allowed
  upward edge below (importing `a.b.c` also runs, so depends on, the packages `a.b`
  and `a`, unless the importer lies inside them);
- no module imports a name starting with `_` from another module (a shared helper
  gets a plain name);
- no module is over 500 lines;
- the layers run one way, `nn` <- `models` <- `huggingface`: `nn` imports neither of
  the others, and `models` imports `huggingface` only through the allowed edge.
"""

import ast
import dataclasses
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "eqx_embed"
MAX_LINES = 500

# (importer, imported): the edges allowed to close a circle, with the reason.
ALLOWED_UPWARD_EDGES = {
    ("eqx_embed.models._transformer", "eqx_embed.huggingface"): (
        "TransformerLM.from_huggingface / to_huggingface are public methods; they "
        "reach the huggingface package through one function-level import of its "
        "public names."
    ),
}


@dataclasses.dataclass(frozen=True)
class Import:
    target: str  # the module imported from, or imported
    names: tuple[str, ...]  # the names taken from it (`from target import ...`)
    in_function: bool


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, *, is_package: bool) -> list[Import]:
    """Every import statement of `module`'s `source`, with relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    tree = ast.parse(source)
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function.update(id(inner) for inner in ast.walk(node))
    for node in ast.walk(tree):
        nested = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [Import(alias.name, (), nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".") if node.module else []
            if node.level:
                parents = package.split(".")
                anchor = parents[: len(parents) - node.level + 1]
                target = ".".join([*anchor, *base])
            else:
                target = ".".join(base)
            names = tuple(alias.name for alias in node.names)
            found.append(Import(target, names, nested))
    return found


def dependencies(importer: str, found: Import, modules: set[str]) -> set[str]:
    """The modules of the package that an import makes `importer` run: the target,
    the submodules named in a `from` import, and the packages above the target;
    never the packages above `importer` itself, which are already running."""
    if found.target.split(".")[0] != "eqx_embed":
        return set()
    targets = {found.target} | {
        f"{found.target}.{name}"
        for name in found.names
        if f"{found.target}.{name}" in modules
    }
    parts = found.target.split(".")
    above_importer = {
        ".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)
    }
    targets |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return (targets & modules) - above_importer


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the modules it depends on, from `{module: (source, is_package)}`,
    the allowed upward edges left out."""
    modules = set(sources)
    graph = {}
    for module, (source, is_package) in sources.items():
        edges = set()
        for found in imports_in(source, module, is_package=is_package):
            for target in dependencies(module, found, modules):
                if not (found.in_function and (module, target) in ALLOWED_UPWARD_EDGES):
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module that
    imports itself), each sorted: Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_imports(source: str, module: str, *, is_package: bool) -> list[str]:
    """`target.name` for each name starting with `_` that `module` imports from
    another module of the package."""
    return [
        f"{found.target}.{name}"
        for found in imports_in(source, module, is_package=is_package)
        if found.target.split(".")[0] == "eqx_embed" and found.target != module
        for name in found.names
        if name.startswith("_")
    ]


def package_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path): (path.read_text(), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


SOURCES = package_sources()


def test_the_subpackages_exist():
    for subpackage in ("nn", "models", "models.families", "huggingface"):
        assert f"eqx_embed.{subpackage}" in SOURCES, subpackage


def test_no_import_circles():
    found = cycles(import_graph(SOURCES))
    assert not found, "import circles:\n" + "\n".join(map(" <-> ".join, found))


def test_the_allowed_upward_edge_exists_and_is_lazy():
    for importer, target in ALLOWED_UPWARD_EDGES:
        source, is_package = SOURCES[importer]
        found = [
            found
            for found in imports_in(source, importer, is_package=is_package)
            if found.target == target
        ]
        assert found and all(f.in_function for f in found), (importer, target)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_private_names_imported_from_other_modules(module):
    source, is_package = SOURCES[module]
    found = private_imports(source, module, is_package=is_package)
    assert not found, (module, found)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_module_over_500_lines(module):
    source, _ = SOURCES[module]
    assert len(source.splitlines()) <= MAX_LINES, (module, len(source.splitlines()))


def imported_layers(module: str, *, module_level_only: bool) -> set[str]:
    source, is_package = SOURCES[module]
    return {
        found.target.split(".")[1]
        for found in imports_in(source, module, is_package=is_package)
        if found.target.startswith("eqx_embed.")
        and not (module_level_only and found.in_function)
    }


@pytest.mark.parametrize(
    "module", [m for m in sorted(SOURCES) if m.startswith("eqx_embed.nn")]
)
def test_nn_imports_neither_models_nor_huggingface(module):
    found = imported_layers(module, module_level_only=False)
    assert not found & {"models", "huggingface"}, (module, found)


@pytest.mark.parametrize(
    "module", [m for m in sorted(SOURCES) if m.startswith("eqx_embed.models")]
)
def test_models_import_huggingface_only_through_the_allowed_edge(module):
    found = imported_layers(module, module_level_only=True)
    assert "huggingface" not in found, (module, found)
    lazy = imported_layers(module, module_level_only=False)
    if "huggingface" in lazy:
        assert (module, "eqx_embed.huggingface") in ALLOWED_UPWARD_EDGES, module


def test_the_checker_sees_each_kind_of_violation():
    """The checker itself, on small made-up packages."""
    # Relative and absolute imports, resolved; function-level ones marked.
    found = imports_in(
        "from ..models import TransformerLM\n"
        "import eqx_embed.huggingface\n"
        "def f():\n    from ._indices import check\n",
        "eqx_embed.nn._x",
        is_package=False,
    )
    assert found == [
        Import("eqx_embed.models", ("TransformerLM",), False),
        Import("eqx_embed.huggingface", (), False),
        Import("eqx_embed.nn._indices", ("check",), True),
    ]
    # A circle through a function-level import, and one through a package's
    # `__init__` (importing `a.b.c` runs `a.b`).
    circle = {
        "eqx_embed": ("", True),
        "eqx_embed.a": ("from .b import g\n", False),
        "eqx_embed.b": ("def g():\n    from .a import f\n", False),
    }
    assert cycles(import_graph(circle)) == [["eqx_embed.a", "eqx_embed.b"]]
    through_init = {
        "eqx_embed": ("", True),
        "eqx_embed.p": ("from ._m import M\n", True),
        "eqx_embed.p._m": ("", False),
        "eqx_embed.q": ("from .p._m import M\n", False),
        "eqx_embed.p._n": ("from ..q import x\n", False),
    }
    through_init["eqx_embed.p"] = ("from ._m import M\nfrom ._n import N\n", True)
    assert cycles(import_graph(through_init)) == [
        ["eqx_embed.p", "eqx_embed.p._n", "eqx_embed.q"]
    ]
    # A sibling import inside a package is no circle with the package's `__init__`,
    # nor is `from . import sibling`.
    siblings = {
        "eqx_embed": ("", True),
        "eqx_embed.p": ("from ._m import M\n", True),
        "eqx_embed.p._m": ("from ._n import N\nfrom . import _o\n", False),
        "eqx_embed.p._n": ("", False),
        "eqx_embed.p._o": ("", False),
    }
    assert cycles(import_graph(siblings)) == []
    # Private names from another module; a module's own names and other packages'
    # do not count.
    source = (
        "from ..models._transformer import TransformerLM, _random_parts\n"
        "from numpy import _private\n"
    )
    assert private_imports(
        source, "eqx_embed.huggingface._model", is_package=False
    ) == ["eqx_embed.models._transformer._random_parts"]
