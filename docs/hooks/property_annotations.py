"""A griffe extension for the API pages (mkdocs.yml loads it by path)."""

import inspect
import re

import griffe
import wadler_lindig

import eqx_embed

# A class's private module path, as `eqx_embed.nn._table_kind.TableKind`.
_PRIVATE_CLASS_PATH = re.compile(r"eqx_embed(?:\.\w+)*?\._\w+\.(\w+)")


def _public_paths(text: str) -> str:
    """`text` with each class that eqx_embed re-exports named by its public path."""
    return _PRIVATE_CLASS_PATH.sub(
        lambda match: (
            f"eqx_embed.{match[1]}" if hasattr(eqx_embed, match[1]) else match[0]
        ),
        text,
    )


class PropertyAnnotations(griffe.Extension):
    """Gives an inspected property the annotation of its getter's return value
    (griffe's inspector leaves it unset, so the page would show no type)."""

    def on_attribute_instance(self, *, node, attr, **kwargs):
        getter = getattr(getattr(node, "obj", None), "fget", None)
        if getter is None or attr.annotation is not None:
            return
        returns = inspect.signature(inspect.unwrap(getter)).return_annotation
        if returns is inspect.Signature.empty:
            return
        if isinstance(returns, type) and returns.__module__.startswith("eqx_embed."):
            # Its public path (every public class is re-exported from eqx_embed), as
            # hippogriffe writes the classes in signatures.
            attr.annotation = f"eqx_embed.{returns.__name__}"
        else:
            # Shapes in double quotes, as in the signatures.
            text = wadler_lindig.pformat(returns, width=9999)
            attr.annotation = _public_paths(text.replace("'", '"'))
