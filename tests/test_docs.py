"""The documentation site: every public name is on an API page with a docstring, every
page is in the navigation, and the code on every page runs."""

import dataclasses
import inspect
import pathlib
import re

import equinox as eqx
import pytest
import yaml

import eqx_embed

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
# The API pages quote declarations; the other pages' code is meant to run.
PAGES_WITH_CODE = sorted(
    path.relative_to(DOCS).as_posix()
    for path in DOCS.rglob("*.md")
    if "```python" in path.read_text() and path.parent != DOCS / "api"
)


def public_names() -> list[str]:
    return sorted(
        name
        for name in dir(eqx_embed)
        if not name.startswith("_") and not inspect.ismodule(getattr(eqx_embed, name))
    )


def documented_on_api_pages() -> set[str]:
    """Names rendered by mkdocstrings (`::: eqx_embed.X`) or given an anchor by hand
    (`{ #eqx_embed.X }`, for type aliases, which mkdocstrings cannot inspect)."""
    text = "\n".join(page.read_text() for page in API_PAGES)
    rendered = re.findall(r"^::: eqx_embed\.(\w+)$", text, flags=re.MULTILINE)
    anchored = re.findall(r"\{ #eqx_embed\.(\w+) \}", text)
    return set(rendered) | set(anchored)


def test_every_public_name_is_on_an_api_page():
    assert public_names(), "eqx_embed exports nothing?"
    missing = set(public_names()) - {"__version__"} - documented_on_api_pages()
    assert not missing, f"public names on no page under docs/api/: {sorted(missing)}"


def test_api_pages_document_only_public_names():
    assert documented_on_api_pages() <= set(public_names())


def own_public_members(cls: type) -> dict[str, object]:
    """Methods and properties `cls` defines itself, public or `__init__`/`__call__`
    (but not a dataclass's generated `__init__`: its class docstring lists the
    fields)."""
    special = (
        ("__call__",)
        if dataclasses.is_dataclass(cls) and not issubclass(cls, eqx.Module)
        else ("__init__", "__call__")
    )
    return {
        name: member
        for name, member in vars(cls).items()
        if (not name.startswith("_") or name in special)
        and (inspect.isfunction(member) or isinstance(member, property))
    }


@pytest.mark.parametrize("name", public_names())
def test_public_name_has_a_docstring(name):
    value = getattr(eqx_embed, name)
    if not (inspect.isclass(value) or inspect.isfunction(value)):
        # A type alias: its documentation is the hand-written section of its page.
        pages = "\n".join(page.read_text() for page in API_PAGES)
        section = pages.split(f"{{ #eqx_embed.{name} }}", 1)[-1].split("\n### ")[0]
        assert len(section.split()) > 20, f"{name}: a section with no text"
        return
    assert inspect.getdoc(value), f"{name} has no docstring"
    if inspect.isclass(value):
        for member_name, member in own_public_members(value).items():
            function = member.fget if isinstance(member, property) else member
            # Equinox wraps methods; the docstring is the wrapped function's.
            function = inspect.unwrap(function)
            assert function.__doc__, f"{name}.{member_name} has no docstring"


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = nav_pages(config["nav"])
    assert len(in_nav) == len(set(in_nav))
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    snippets = {p for p in on_disk if p.startswith("generated/")}
    assert set(in_nav) == on_disk - snippets


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_code_runs(page):
    """The ```python blocks of a page, in order, in one namespace, as a reader would
    paste them."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.DOTALL)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)


def documented_objects() -> list[str]:
    """The public classes and functions (not the type aliases, whose documentation is
    their section of an API page)."""
    return [
        name
        for name in public_names()
        if inspect.isclass(getattr(eqx_embed, name))
        or inspect.isfunction(getattr(eqx_embed, name))
    ]


@pytest.mark.parametrize("name", documented_objects())
def test_public_docstring_says_what_raises_and_has_an_example_that_runs(name):
    """Each public class and function: a **Raises:** section and an **Example:**
    whose code runs, in a fresh namespace, as a reader would paste it."""
    doc = inspect.getdoc(getattr(eqx_embed, name))
    assert "**Raises:**" in doc, f"{name}: no **Raises:** section"
    examples = re.findall(r"\*\*Example:\*\*\s*```python\n(.*?)```", doc, re.DOTALL)
    assert examples, f"{name}: no **Example:** with a ```python block"
    for example in examples:
        exec(compile(example, f"<{name} example>", "exec"), {})


def is_checked(function) -> bool:
    """Whether `function` is wrapped by jaxtyping's `jaxtyped` (`checked`)."""
    while function is not None:
        code = getattr(function, "__code__", None)
        if "jaxtyping" in getattr(code, "co_filename", ""):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def test_contracts_page_every_public_call_is_checked():
    unchecked = []
    for name in documented_objects():
        value = getattr(eqx_embed, name)
        if inspect.isfunction(value):
            unchecked += [] if is_checked(value) else [name]
            continue
        for member_name, member in vars(value).items():
            if isinstance(member, classmethod | staticmethod):
                member = member.__func__
            if member_name.startswith("_") and member_name != "__call__":
                continue  # private, or a constructor (which checks its arguments)
            if inspect.isfunction(member) and not is_checked(member):
                unchecked.append(f"{name}.{member_name}")
    assert not unchecked, f"public calls without `checked`: {unchecked}"


def test_contracts_page_quotes_the_real_annotation_of_token():
    import numpy as np
    from jaxtyping import Array, Float, Integer, PRNGKeyArray

    page = (DOCS / "guides" / "contracts.md").read_text()
    quoted = re.search(r"Embedding\.__call__\(\n(.*?)\n\) -> (.*?)\n", page, re.DOTALL)
    parameters, returns = quoted.groups()
    namespace = dict(
        Array=Array, Float=Float, Integer=Integer, PRNGKeyArray=PRNGKeyArray, np=np
    )
    signature = inspect.signature(inspect.unwrap(eqx_embed.Embedding.__call__))
    for line in parameters.strip().rstrip(",").split(",\n"):
        name, _, annotation = line.strip().partition(": ")
        if name == "*":
            continue
        annotation = annotation.split(" = ")[0]
        expected = signature.parameters[name].annotation
        # jaxtyping makes a new class per subscription: compare what they print.
        assert str(eval(annotation, namespace)) == str(expected), name
    assert str(eval(returns, namespace)) == str(signature.return_annotation)


def architecture_module_names(text: str) -> set[str]:
    """The module files the architecture page names (`_loss.py`, `families/_spec.py`,
    `nn/_rope.py`...), as paths relative to their package where a package is given."""
    return set(re.findall(r"`((?:[\w<>]+/)*[\w<>]+\.py)`", text))


def test_the_architecture_page_names_every_module_and_only_real_ones():
    """docs/guides/architecture.md matches the code: every module of the package is
    on it (by file name), and every path it names exists."""
    text = (DOCS / "guides" / "architecture.md").read_text()
    named = architecture_module_names(text)
    package = ROOT / "eqx_embed"
    modules = [
        path
        for path in package.rglob("*.py")
        if path.name != "__init__.py"
        and path.parent.name != "families"
        or path.name == "_spec.py"
    ]
    missing = sorted(
        str(path.relative_to(package))
        for path in modules
        if path.name not in {name.rsplit("/", 1)[-1] for name in named}
    )
    assert not missing, f"modules the architecture page does not name: {missing}"
    for name in named:
        if "<" in name:  # a pattern, as `families/<family>.py`
            continue
        if (ROOT / name).exists():  # from the repository's root: `tests/...`
            continue
        matches = package.rglob(name.rsplit("/", 1)[-1])
        assert any(p.as_posix().endswith("/" + name) for p in matches), name


def test_the_architecture_page_checker_sees_names():
    text = "the `nn/_loss.py` walk, `_mesh.py`, `families/<family>.py`, not `x.md`"
    assert architecture_module_names(text) == {
        "nn/_loss.py",
        "_mesh.py",
        "families/<family>.py",
    }
