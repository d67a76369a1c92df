"""MkDocs hooks: pages whose reference is generated from the code at build time, so it cannot drift.

Two markers, each alone on a line of a page's Markdown:

* ``<!-- geoseg:api -->`` becomes one mkdocstrings directive (``::: module.name``) per public name of
  ``geoseg`` (its ``__all__``), pointing at the module that defines it. ``geoseg`` imports these names
  lazily (a module ``__getattr__``), which mkdocstrings cannot follow; the defining module is found by
  importing the name, so the page follows the code wherever a name moves.
* ``<!-- geoseg:config CLASS [LABEL] -->`` becomes key tables of the pydantic model ``CLASS``
  (``TrainConfig``, ``PretrainConfig``), one per section, from its fields: type, default, bounds and
  description; ``LABEL`` starts each section's heading, to tell two models apart on one page.

An unknown name fails the build (an exception), as a broken link does under ``mkdocs build --strict``.

Two fixes on every page's HTML, for text written for ``--help`` and for Sphinx rather than Markdown:
placeholders such as ``<stem>`` in the click commands' help (Markdown passes them on as unknown HTML
tags, which browsers hide) are escaped, and the Sphinx roles of the docstrings (``:func:`x` ``) are dropped,
leaving the name in code.
"""

from __future__ import annotations

import importlib
import re
import types
import typing
from typing import Any

_API = re.compile(r"^<!-- geoseg:api -->$", re.M)
_CONFIG = re.compile(r"^<!-- geoseg:config (\w+)(?: (\w+))? -->$", re.M)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    markdown = _API.sub(lambda m: _api_directives(), markdown)
    return _CONFIG.sub(lambda m: _config_tables(m.group(1), m.group(2)), markdown)


def on_page_content(html: str, **kwargs: Any) -> str:
    html = _ROLE.sub(r"\1", html)
    return _TAG.sub(lambda m: m.group(0) if m.group(1).lower() in _HTML_TAGS else f"&lt;{m.group(1)}&gt;", html)


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj|const|py:\w+):(<code>)")
# an opening tag without attributes: <stem>, <name>, <output-dir>; real elements are kept
_TAG = re.compile(r"<([A-Za-z][\w-]*)>")
_HTML_TAGS = frozenset((
    "a", "abbr", "b", "blockquote", "body", "br", "button", "caption", "code", "col", "colgroup", "dd",
    "del", "details", "dfn", "div", "dl", "dt", "em", "figcaption", "figure", "footer", "h1", "h2", "h3",
    "h4", "h5", "h6", "head", "header", "hr", "html", "i", "img", "input", "kbd", "label", "li", "main",
    "mark", "nav", "ol", "p", "pre", "q", "s", "samp", "script", "section", "small", "span", "strong",
    "style", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "title", "tr", "u",
    "ul", "var", "wbr", "svg", "path",
))


# ---------------------------------------------------------------------------------------------- API


def _api_directives() -> str:
    import geoseg

    blocks = []
    for name in geoseg.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(geoseg, name)
        module = getattr(obj, "__module__", None)
        if not module or not module.startswith("geoseg"):
            raise RuntimeError(f"geoseg.{name}: cannot tell which geoseg module defines it ({module!r})")
        blocks.append(f"::: {module}.{name}\n")
    return "\n".join(blocks)


# ------------------------------------------------------------------------------------------ config


def _config_model(name: str) -> type:
    import geoseg

    # geoseg.load_config lives in the module that defines the config models, wherever the package puts it
    module = importlib.import_module(geoseg.load_config.__module__)
    model = getattr(module, name, None)
    if model is None:
        raise RuntimeError(f"<!-- geoseg:config {name} -->: {module.__name__} has no {name}")
    return model


def _config_tables(name: str, label: str | None = None) -> str:
    from pydantic import BaseModel

    sections: list[tuple[str, type[BaseModel]]] = []

    def walk(prefix: str, model: type[BaseModel]) -> None:
        sections.append((prefix, model))
        for key, field in model.model_fields.items():
            sub = _sub_model(field.annotation)
            if sub is not None:
                is_list = typing.get_origin(field.annotation) is list
                walk(f"{prefix}{key}{'[]' if is_list else ''}.", sub)

    walk("", _config_model(name))
    out = []
    for prefix, model in sections:
        title = f"`{prefix.rstrip('.')}`" if prefix else "top level"
        if label:  # a second model on one page: its headings (and their anchors) say which
            title = f"{label}: {title}"
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc.startswith("Usage docs:"):  # pydantic's own BaseModel docstring: the class has none
            doc = ""
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            sub = _sub_model(field.annotation)
            meaning = field.description or ""
            if sub is not None:
                anchor = f"{prefix}{key}{'[]' if typing.get_origin(field.annotation) is list else ''}"
                meaning = (meaning + "; " if meaning else "") + f"see `{anchor}` below"
            rows.append(f"| `{key}` | {_type_text(field.annotation)} | {_default_text(field)} | "
                        f"{_escape(meaning + _bounds_text(field))} |")
        out.append(f"### {title}\n\n" + (f"{_escape(doc)}\n\n" if doc else "") + "\n".join(rows) + "\n")
    return "\n".join(out)


def _sub_model(annotation: Any) -> type | None:
    from pydantic import BaseModel

    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        text = " \\| ".join(f"`{a}`" for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " \\| ".join(_type_text(a) for a in args)
    elif origin is list:
        text = f"list of {_type_text(args[0])}"
    elif origin is tuple:
        text = "(" + ", ".join(_type_text(a) for a in args) + ")"
    elif origin is dict:
        text = "mapping"
    elif annotation is type(None):
        text = "null"
    elif _sub_model(annotation) is not None:
        text = "section"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return text


def _default_text(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
        if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            return " + ".join(f"`{getattr(v, 'name', v)}`" for v in value)
        return f"`{value!r}`" if value else ""
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "`null`"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    if isinstance(field.default, tuple):
        return f"`{list(field.default)}`"
    return f"`{field.default}`"


def _bounds_text(field: Any) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least"}
    parts = []
    for meta in field.metadata:
        for attr, mark in marks.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{mark} {value}" + (" item(s)" if attr == "min_length" else ""))
    return f" ({', '.join(parts)})" if parts else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
