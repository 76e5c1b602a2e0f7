"""mkdocs hooks for the API pages. The first lets hippogriffe 0.2.2 (the latest) run
under griffe 2.

hippogriffe does its work (public paths such as `equinox.Module`, jaxtyping shapes
with their quotes, classes' bases) in the griffe event `on_package_loaded`, which
griffe 2 renamed `on_package`; without this, griffe never calls it and the site
silently falls back to mkdocstrings' plain rendering.
"""

import re

import griffe
from hippogriffe._extension import HippogriffeExtension

if "on_package" not in vars(HippogriffeExtension) and not hasattr(
    griffe.Extension, "on_package_loaded"
):

    def _on_package(self, *, pkg, loader, **kwargs):
        self.on_package_loaded(pkg=pkg, loader=loader, **kwargs)
        _name_function_defaults(pkg, seen=set())

    HippogriffeExtension.on_package = _on_package


_FUNCTION_REPR = re.compile(r"<(?:wrapped )?function ([\w.]+)>")


def _name_function_defaults(obj, *, seen):
    """hippogriffe prints a default that is a function (`init=default_embedding_init`)
    as `<function default_embedding_init>`, which is not Python, so the signature
    formatter gives up on the whole signature: print its name instead."""
    if obj.is_alias or id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.is_function:
        for parameter in obj.parameters:
            if isinstance(parameter.default, str):
                parameter.default = _FUNCTION_REPR.sub(r"\1", parameter.default)
    for member in obj.members.values():
        _name_function_defaults(member, seen=seen)


def on_env(env, *, config, files):
    """Classes' base `equinox.Module` links to Equinox's own documentation (the build
    fetches no inventory, so tell autorefs where it is)."""
    config.plugins["autorefs"].register_url(
        "equinox.Module",
        "https://docs.kidger.site/equinox/api/module/module/#equinox.Module",
    )
    return env
