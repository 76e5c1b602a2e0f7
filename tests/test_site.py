"""The documentation site builds (`mkdocs build --strict`), and its API pages read like
Equinox's: no builtin docstrings inherited by fields, no `__init__` stubs, no private
module paths, members in the order `__init__`, `__call__`, the rest, `equinox.Module`
as the base; no stray pages, no MathJax, a `site_url`."""

import html
import inspect
import os
import pathlib
import re
import subprocess
import sys

import equinox as eqx
import pytest
import yaml

import eqx_embed

ROOT = pathlib.Path(__file__).resolve().parent.parent
API_PAGES = sorted(p.stem for p in (ROOT / "docs" / "api").glob("*.md"))

# Text that Python's builtins' docstrings (str, int, bool, float) would bring.
BUILTIN_DOCSTRINGS = [
    "str(object=",
    "int([x])",
    "bool(x) -> bool",
    "Convert a string or number to a floating point number",
    "Initialize self.",
    "See help(type(self))",
]
PRIVATE_PATHS = re.compile(
    r"equinox\._|eqx_embed\.(?:nn\.|models\.|huggingface\.)?_|jax\._src|jaxlib\."
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site_dir],
        cwd=ROOT,
        # The checkout's eqx_embed, whatever else is installed.
        env={**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def page_text(site: pathlib.Path, page: str) -> str:
    """The visible text of a built page (tags dropped, entities decoded)."""
    markup = (site / page / "index.html").read_text()
    markup = re.sub(r"<(script|style)\b.*?</\1>", "", markup, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


@pytest.mark.parametrize("page", API_PAGES)
def test_api_page_has_no_builtin_docstrings_or_stubs(site, page):
    text = page_text(site, f"api/{page}")
    found = [snippet for snippet in BUILTIN_DOCSTRINGS if snippet in text]
    assert not found, f"api/{page}: {found}"


@pytest.mark.parametrize("page", API_PAGES)
def test_api_page_shows_only_public_paths(site, page):
    text = page_text(site, f"api/{page}")
    private = sorted(set(PRIVATE_PATHS.findall(text)))
    assert not private, f"api/{page}: private paths {private}"


@pytest.mark.parametrize("page", API_PAGES)
def test_api_page_classes_show_equinox_module_and_init_then_call(site, page):
    markup = (site / f"api/{page}" / "index.html").read_text()
    text = page_text(site, f"api/{page}")
    anchors = re.findall(r'id="eqx_embed\.([A-Z]\w+)"', markup)
    classes = [
        f"eqx_embed.{name}"
        for name in anchors
        if inspect.isclass(value := getattr(eqx_embed, name))
        and issubclass(value, eqx.Module)
    ]
    for cls in classes:
        # An equinox.Module, directly or through a public base (a table kind).
        assert re.search(
            rf"{re.escape(cls)}\((equinox\.Module|eqx_embed\.\w+)\)", text
        ), cls
        members = re.findall(rf'id="{re.escape(cls)}\.(\w+)"', markup)
        expected_first = [m for m in ("__init__", "__call__") if m in members]
        assert members[: len(expected_first)] == expected_first, (cls, members)


def test_shapes_keep_their_quotes(site):
    text = page_text(site, "api/embedding")
    assert 'Float[Array, "embedding_size"]' in text
    assert "Float[Array, embedding_size]" not in text


def test_no_stray_pages_and_no_mathjax(site):
    assert not (site / "generated").exists()  # a snippet, included by a page
    assert not (site / "scripts").exists()
    assert not (site / "hooks").exists()
    for page in site.rglob("*.html"):
        assert "mathjax" not in page.read_text().lower(), page


def test_site_url_is_set_and_used(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["site_url"].startswith("https://")
    index = (site / "index.html").read_text()
    assert f'<link rel="canonical" href="{config["site_url"]}' in index
