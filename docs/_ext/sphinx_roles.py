"""A griffe extension for the API reference: Sphinx roles in docstrings become code spans.

hessinv's docstrings cite objects as ``:class:`Factorization```, ``:func:`~a.b``,
``:mod:`hessinv.trace``` (Sphinx roles); Markdown would show the role names.
This rewrites each to a code span of its target (``~`` keeps the last name).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
