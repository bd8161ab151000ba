"""Griffe extension for the API reference: the docstrings' Sphinx roles read as code in Markdown.

``:class:`~abkd_vision.losses.AlphaBetaDivergence``` becomes ```AlphaBetaDivergence``` (the full path without
``~``), and a paragraph ending in ``::`` (a literal block follows) ends in ``:``. Loaded by ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2).strip()
    label = target.rsplit(".", 1)[-1] if short else target
    return f"``{label}``"


def plain_roles(text: str) -> str:
    """The docstring with its roles as inline code and its ``::`` literal-block markers as ``:``."""
    text = _ROLE.sub(_code, text)
    text = re.sub(r"^\s*::\s*$", "", text, flags=re.MULTILINE)
    return _LITERAL.sub(":", text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
