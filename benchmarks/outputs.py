"""The `--out` (JSON) and `--markdown` files of the benchmark scripts."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text(path: str, text: str) -> None:
    """`text` to `path` through a temporary file in the same folder and a rename: a run that dies
    while writing leaves the previous file whole."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_outputs(out: str | None, data: Any, markdown: str | None, table: str, indent: int = 2) -> None:
    """`data` as JSON to `out` and `table` to `markdown`, each where given."""
    if out:
        write_text(out, json.dumps(data, indent=indent, default=str))
    if markdown:
        write_text(markdown, table if table.endswith("\n") else table + "\n")
