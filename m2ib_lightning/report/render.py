"""The report's HTML: Jinja templates (``templates/``, shipped as package data), autoescaped.

Every value reaches the HTML through a template with autoescaping on, so a caption, a token, an id
or a metric name containing ``<script>`` or ``&`` is shown, never interpreted. Nothing is marked
safe by hand: the images are ``data:image/png;base64,...`` URIs (no character that needs escaping)
placed in ``src`` attributes by the templates, and the token spans are built by a template macro.
``report.css`` and ``report.js`` are included by the page template as template text: they must not
contain ``{{``, ``{%`` or ``{#``.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jinja2

__all__ = ["attr_name", "fmt", "macro", "render"]


def fmt(value: float) -> str:
    """A number as the report shows it: 4 decimals, or 4 significant digits from 1000 up."""
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def attr_name(name: str) -> str:
    """A metric name as part of an HTML attribute name (``data-<name>``, the sort keys): ``a/b_c`` -> ``a-b-c``."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("m2ib_lightning.report", "templates"),
        autoescape=True,  # every template writes HTML
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the build instead of vanishing
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=fmt, attr_name=attr_name, dumps=json.dumps, key=lambda v: f"{v:.6g}")
    return env


def render(template: str, **context: Any) -> str:
    """``templates/<template>`` rendered with ``context``."""
    return _environment().get_template(template).render(**context)


def macro(template: str, name: str, *args: Any) -> str:
    """The macro ``name`` of ``templates/<template>`` called with ``args``."""
    return str(getattr(_environment().get_template(template).module, name)(*args))
