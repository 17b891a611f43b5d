"""The Python examples of README.md and docs/ run as written.

Every ```python block of a page runs, in page order and in one namespace, as a reader would paste
them. Hub ids and placeholder paths such as "path/to/llama-or-qwen" resolve to a tiny random Llama
and a word-level chat tokenizer saved in a temporary directory (`from_pretrained` on an existing
directory loads it as usual), so the examples run offline in seconds. Shell commands, YAML and text
are fenced with another language and are not run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import REPO as ROOT
from tests.helpers.tiny_models import tiny_chat_tokenizer, tiny_model

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).with_suffix("").as_posix()


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, the code dedented by its fence's indentation."""
    blocks = []
    for m in FENCE.finditer(page.read_text(encoding="utf-8")):
        indent = len(m["indent"])
        code = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        blocks.append((m["lang"], code))
    return blocks


def python_blocks(page: Path) -> list[str]:
    return [code for lang, code in fenced_blocks(page) if lang == "python"]


PAGES_WITH_EXAMPLES = [page for page in PAGES if python_blocks(page)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama and its tokenizer, saved as a model directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(directory)
    tiny_chat_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_hub(tiny_checkpoint: Path, monkeypatch, tmp_path) -> None:
    """`from_pretrained` of any name that is not a local directory loads the tiny checkpoint; the
    examples run in an empty working directory."""
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        real = auto.from_pretrained

        def from_pretrained(name, *args, _real=real, **kwargs):
            local = isinstance(name, (str, os.PathLike)) and os.path.isdir(name)
            return _real(name if local else tiny_checkpoint, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)


def test_the_pages_have_examples() -> None:
    names = {page_name(page) for page in PAGES_WITH_EXAMPLES}
    assert {"README", "docs/quickstart", "docs/training"} <= names


def test_python_blocks_are_fenced_as_python() -> None:
    """A block fenced `py` or `python3` would silently escape this test."""
    for page in PAGES:
        langs = {lang for lang, _ in fenced_blocks(page)}
        assert not langs & {"py", "python3", "pycon", "ipython"}, page_name(page)


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=page_name)
def test_examples_run(page: Path, tiny_hub: None) -> None:
    namespace: dict = {"__name__": "__main__"}
    for i, code in enumerate(python_blocks(page), 1):
        exec(compile(code, f"{page_name(page)}.md, example {i}", "exec"), namespace)
