"""MkDocs hook: the configuration reference is generated from `MoEConfig`'s fields.

`docs/configuration.md` holds the placeholder below; this hook replaces it with one table row per
field (name, type, default, help text from the field's metadata), so the page cannot drift from the
code. `moetune/config.py` imports no other moetune module, so it is loaded from its file alone,
without importing the package (and torch with it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

PLACEHOLDER = "<!-- moe-config-table -->"
CONFIG_FILE = Path(__file__).resolve().parent.parent / "moetune" / "config.py"


def _config_module():
    spec = importlib.util.spec_from_file_location("_moetune_config_for_docs", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


def _text(text: str) -> str:
    """One line; a pipe escaped (pipes inside backticks need no escape: the tables extension skips them)."""
    return " ".join(text.split()).replace("|", "\\|")


def config_table() -> str:
    fields = dataclasses.fields(_config_module().MoEConfig)
    rows = ["| field | type | default | help |", "|---|---|---|---|"]
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{f.name}` | `{f.type}` | `{default!r}` | {_text(f.metadata['help'])} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, config_table())
