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
