"""Fuzz tests (hypothesis) of the config and data loaders with random and malformed input.

Contract checked on every input: a loader either returns a well-formed result, or raises its documented
error type with a message naming the file —

* `moetune.app.data.load_examples` (.jsonl / .json / .csv): `DataError` (a ValueError);
* `moetune.app.run_config.load_run_config` (YAML): `ConfigError` (a ValueError);
* `MoEConfig.load` (moetune_config.json): ValueError; `MoEConfig.from_dict`: ValueError.

Never another exception type (KeyError, TypeError, AttributeError, RecursionError, csv.Error, a bare
UnicodeDecodeError...), never a hang. Inputs: random bytes and text, JSON/YAML built from random values
(wrong types, huge numbers, NaN, unicode, non-string keys), and mutations of valid files (truncation,
byte flips, insertions, deletions, deep nesting, a UTF-8 BOM, empty files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moetune.app.data import KNOWN_KEYS, DataError, Example, load_examples
from moetune.app.run_config import ConfigError, RunConfig, load_run_config
from moetune.config import CONFIG_NAME, MoEConfig

FUZZ = settings(
    max_examples=150,
    deadline=None,  # a shared CPU; hangs are caught by `within` instead
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
BOM = b"\xef\xbb\xbf"


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: a SIGALRM timer around the call (pytest's main thread)."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the loader took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------------------ strategies
huge_numbers = st.sampled_from([10**400, -(10**4000), 1e308, -0.0, 2**63, 2**64 + 1])
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_numbers
    | st.floats()  # nan and inf included
    | st.text(max_size=12)
    | st.sampled_from(["", "assistant", "user", "ffn", "topk", "\u202e\U0001f600", "\x00"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# mostly-valid records: known fields with random values, sometimes a stray field
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | json_values, "content": json_values}
)
records = st.one_of(
    st.dictionaries(st.sampled_from(sorted(KNOWN_KEYS)), st.text(max_size=8) | json_values, max_size=5),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=8), "response": st.text(max_size=8)},
        optional={"task": json_values, "input": json_values, "system": json_values, "extra": json_values},
    ),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | json_values}),
    json_values,
)


def dump_json(value: Any) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, max_depth: int = 100_000) -> bytes:
    """A valid file damaged: truncated, a byte flipped, bytes inserted or deleted, nested, a BOM, emptied."""
    how = draw(
        st.sampled_from(["as is", "truncate", "flip", "insert", "delete", "nest", "bom", "empty", "repeat"])
    )
    n = len(valid)
    at = draw(st.integers(0, n))
    if how == "truncate":
        return valid[:at]
    if how == "flip" and n:
        i = min(at, n - 1)
        return valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1 :]
    if how == "insert":
        noise = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\n", b",", b"{", b'"']))
        return valid[:at] + noise + valid[at:]
    if how == "delete":
        return valid[:at] + valid[at + draw(st.integers(1, 16)) :]
    if how == "nest":
        depth = draw(st.sampled_from([2, 50, 3000, max_depth]))
        return b"[" * depth + valid + b"]" * draw(st.sampled_from([depth, 0]))
    if how == "bom":
        return BOM + valid
    if how == "empty":
        return draw(st.sampled_from([b"", b"\n", b"   \n\n", BOM]))
    if how == "repeat":
        return valid * draw(st.integers(2, 4))
    return valid


# ------------------------------------------------------------------------------------------ data files
def data_file(record_list: list[Any], ext: str) -> bytes:
    if ext == ".jsonl":
        return "".join(dump_json(r) + "\n" for r in record_list).encode()
    if ext == ".json":
        return dump_json(record_list).encode()
    # .csv: one header of the records' keys
    keys = sorted({str(k) for r in record_list if isinstance(r, dict) for k in r}) or ["prompt"]
    lines = [",".join(keys)]
    for r in record_list:
        row = r if isinstance(r, dict) else {}
        lines.append(",".join(json.dumps(str(row.get(k, "")), ensure_ascii=False) for k in keys))
    return ("\n".join(lines) + "\n").encode()


@st.composite
def data_contents(draw: st.DrawFn) -> tuple[str, bytes]:
    ext = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".JSONL"]))
    source = draw(st.sampled_from(["bytes", "text", "records"]))
    if source == "bytes":
        return ext, draw(st.binary(max_size=200))
    if source == "text":
        return ext, draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    content = data_file(draw(st.lists(records, max_size=4)), ext)
    return ext, draw(mutated(content))


def check_examples(examples: list[Example]) -> None:
    """What a loaded example must be: (role, text) messages, the assistant's last, a task name."""
    assert examples
    for ex in examples:
        assert isinstance(ex, Example) and ex.messages and isinstance(ex.task, str) and ex.task
        assert all(isinstance(role, str) and isinstance(text, str) for role, text in ex.messages)
        assert ex.messages[-1][0] == "assistant"


def load_data(path: Path) -> list[Example] | DataError:
    with within(10):
        try:
            return load_examples(path)
        except DataError as err:
            return err


@FUZZ
@given(data_contents())
@example((".jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n"))  # was RecursionError
@example((".json", b"[" * 100_000))  # was RecursionError
@example((".jsonl", b'{"prompt": ' + b"9" * 5000 + b', "response": "a"}\n'))  # was a bare ValueError
@example((".csv", b"prompt,response\n" + b"a" * 200_000 + b",b\n"))  # was csv.Error (field limit)
@example((".csv", b"\xef\xbb\xbfprompt,response\na,b,c,d\n"))  # was TypeError (sorting None with str)
@example((".jsonl", b'{"messages": [{"role": 5, "content": "x"}, {"role": "assistant", "content": "y"}]}\n'))
def test_data_loader_fuzz(workdir: Path, case: tuple[str, bytes]) -> None:
    ext, content = case
    path = workdir / f"data{ext}"
    path.write_bytes(content)
    result = load_data(path)
    if isinstance(result, DataError):
        assert str(path) in str(result), str(result)
    else:
        check_examples(result)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv"])
def test_data_with_bom_loads(workdir: Path, ext: str) -> None:
    """A UTF-8 byte order mark (Windows editors write one) is skipped, not taken for data."""
    rows = [{"prompt": "what is 2 + 2 ?", "response": "4"}, {"prompt": "hi", "response": "there"}]
    path = workdir / f"bom{ext}"
    path.write_bytes(data_file(rows, ext))
    plain = load_examples(path)
    path.write_bytes(BOM + data_file(rows, ext))
    assert load_examples(path) == plain
    assert [ex.messages for ex in plain] == [
        (("user", "what is 2 + 2 ?"), ("assistant", "4")),
        (("user", "hi"), ("assistant", "there")),
    ]


# ------------------------------------------------------------------------------------------ YAML run configs
VALID_YAML = """\
model: tiny-model
seed: 3
router_lr_multiplier: 2.0
moe:
  num_experts: 4
  top_k: 2
  router: topp
  top_p: 0.7
  r: 4
  aux_loss_coef: 0.01
data:
  train: [train.jsonl, {path: b.jsonl, task: b, weight: 2}]
  test: test.jsonl
  max_length: 128
  balance_tasks: true
  options: {b: [positive, negative]}
training:
  max_steps: 3
  learning_rate: 0.001
"""

yaml_scalars = (
    scalars
    | st.sampled_from([".nan", ".inf", "~", "2001-02-30", "0x1F", "1:20", "!!python/object:os.system", "*x"])
    | st.dates()
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(scalars, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def yaml_documents(draw: st.DrawFn) -> bytes:
    source = draw(st.sampled_from(["bytes", "text", "leaf", "tree", "valid"]))
    if source == "bytes":
        return draw(st.binary(max_size=200))
    if source == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if source == "leaf":  # the valid config with one value replaced by anything
        doc = yaml.safe_load(VALID_YAML)
        section = draw(st.sampled_from(["", "moe", "data", "training"]))
        target = doc if not section else doc[section]
        key = draw(st.sampled_from(sorted(target)) | st.text(max_size=6) | st.integers())
        target[key] = draw(yaml_values)
        return yaml.safe_dump(doc, allow_unicode=True).encode()
    if source == "tree":
        keys = st.sampled_from(["model", "moe", "data", "training", "seed", "train", "path"]) | scalars
        tree = draw(st.dictionaries(keys, yaml_values, max_size=4) | yaml_values)
        return yaml.safe_dump(tree, allow_unicode=True).encode()
    # nesting kept short of 100k: without libyaml (run.YAML_LOADER), PyYAML's pure-Python scanner takes
    # seconds per few thousand brackets
    return draw(mutated(VALID_YAML.encode(), max_depth=3000))


def load_config(path: Path) -> RunConfig | ConfigError:
    with warnings.catch_warnings(), within(10):
        warnings.simplefilter("ignore")
        try:
            return load_run_config(path)
        except ConfigError as err:
            return err


@FUZZ
@given(yaml_documents())
@example(b"[" * 3000 + b"]" * 3000)  # was RecursionError
@example(b"seed: " + b"9" * 5000)  # was a bare ValueError (int digits limit)
@example(b"seed: 2001-02-30\n")  # an impossible date: was a bare ValueError
@example(b"model: \xff\n")  # was UnicodeDecodeError
@example(b"1: 2\nfoo: 3\n")  # was TypeError (sorting int with str keys)
@example(b"data: {train: [a.jsonl]}\ntraining: {1: 2, foo: 3}\n")  # was TypeError
@example(b"data: {train: [a.jsonl]}\nmoe: {top_p: x}\n")  # was TypeError (0.0 < 'x')
@example(b"data: {train: [a.jsonl]}\nmoe: {capacity_factor: .nan}\n")  # was accepted
@example(b"data: {train: [a.jsonl]}\nmoe: {r: 2.5}\n")  # was a bare ValueError without the file
def test_run_config_loader_fuzz(workdir: Path, content: bytes) -> None:
    path = workdir / "run.yaml"
    path.write_bytes(content)
    result = load_config(path)
    if isinstance(result, ConfigError):
        assert str(path) in str(result), str(result)
    else:
        assert isinstance(result, RunConfig) and isinstance(result.moe, MoEConfig)
        assert result.data.train and all(isinstance(s.path, str) and s.path for s in result.data.train)
        assert isinstance(result.model, str) and isinstance(result.training, dict)


def test_valid_yaml_loads_and_bom_is_skipped(workdir: Path) -> None:
    path = workdir / "valid.yaml"
    path.write_text(VALID_YAML)
    cfg = load_run_config(path)
    assert (
        cfg.moe.router == "topp"
        and cfg.data.train[1].weight == 2
        and cfg.data.options == {"b": ["positive", "negative"]}
    )
    path.write_bytes(BOM + VALID_YAML.encode())
    assert load_run_config(path) == cfg


def test_yaml_alias_bomb_gives_a_short_error(workdir: Path) -> None:
    """YAML aliases make a 1 kB file a value of 10^7 leaves; the error shows a bounded repr of it (the
    full repr took seconds and tens of MB; deeper bombs would hang)."""

    def level(i: int) -> str:  # &a_i [<level i-1>, *a_{i-1} x 9]: 10^(i+1) leaves
        if i == 0:
            return "&a0 [" + ", ".join(["x"] * 10) + "]"
        return f"&a{i} [{level(i - 1)}, " + ", ".join([f"*a{i - 1}"] * 9) + "]"

    path = workdir / "bomb.yaml"
    for key in ("model", "seed", "router_lr_multiplier"):
        path.write_text(f"{key}: {level(6)}\ndata: {{train: [t.jsonl]}}\n")
        with within(10), pytest.raises(ConfigError) as err:
            load_run_config(path)
        assert str(path) in str(err.value) and f"{key}=[[[" in str(err.value), str(err.value)[:200]
        assert len(str(err.value)) < 1000
    for section in (
        "moe: {router: %s}",
        "moe: {num_experts: %s}",
        "moe: {r: %s}",
        "data: {train: 5, test: %s}",
    ):
        path.write_text(section % level(6) + "\n")
        with within(10), pytest.raises(ConfigError) as err:
            load_run_config(path)
        assert str(path) in str(err.value) and len(str(err.value)) < 1000


# ------------------------------------------------------------------------------------------ MoEConfig
FIELDS = {f.name: f for f in dataclasses.fields(MoEConfig)}
DEFAULTS = MoEConfig().to_dict()


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Values for a MoEConfig field: its default, values of its type (wild ones too), or anything."""
    kind = str(FIELDS[name].type).removesuffix(" | None")
    typed = {
        "int": st.integers(-2, 12) | huge_numbers,
        "float": st.floats(-0.5, 2.0) | st.floats() | st.integers(-1, 3),
        "bool": st.booleans(),
        "str": st.text(max_size=6),
    }.get(kind, json_values)
    return st.just(DEFAULTS[name]) | typed | json_values


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    data: dict[Any, Any] = {name: draw(field_values(name)) for name in names}
    data.update(
        draw(st.dictionaries(st.text(max_size=6) | st.integers() | st.none(), json_values, max_size=2))
    )
    return data


def from_dict(data: Any) -> MoEConfig | ValueError:
    with warnings.catch_warnings(), within(10):
        warnings.simplefilter("ignore")
        try:
            return MoEConfig.from_dict(data)
        except ValueError as err:
            return err


@FUZZ
@given(config_dicts() | json_values)
@example({"top_p": "x"})  # was TypeError
@example({"capacity_factor": math.nan})  # was accepted
@example({"lora_alpha": 10**400})  # an int too large for a float
@example({1: 2, "foo": 3})  # was TypeError (sorting the unknown keys)
@example([["top_k", 2]])  # not a mapping: was AttributeError
@example({"skip_nonfinite": "no"})  # a truthy string: was accepted as True
def test_moe_config_from_dict_fuzz(data: Any) -> None:
    result = from_dict(data)
    if isinstance(result, MoEConfig):
        assert isinstance(data, dict)
        for name in FIELDS:  # the given values were kept, the rest are defaults
            assert getattr(result, name) == data.get(name, DEFAULTS[name]), name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert MoEConfig.from_json(result.to_json()) == result
    else:
        assert str(result)


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    source = draw(st.sampled_from(["bytes", "dict", "valid"]))
    if source == "bytes":
        return draw(st.binary(max_size=200))
    if source == "dict":
        data = draw(config_dicts() | json_values)
        try:
            return dump_json(data).encode()
        except (TypeError, ValueError):  # non-string keys json cannot write
            return b"{}"
    valid = (MoEConfig(num_experts=4, router="switch").to_dict()) | {"_base_model": "m"}
    return draw(mutated(json.dumps(valid, indent=2).encode()))


@FUZZ
@given(config_files())
@example(b"[1]")  # was AttributeError (a list has no .pop)
@example(b"[" * 100_000)  # was RecursionError
@example(b'{"r": ' + b"9" * 5000 + b"}")  # was a ValueError without the file name
@example(b'{"router": "top2"}')  # was a ValueError without the file name
@example(b'{"r": 4, "x": \xff}')  # not UTF-8
def test_moe_config_load_fuzz(workdir: Path, content: bytes) -> None:
    directory = workdir / "adapter"
    directory.mkdir(exist_ok=True)
    path = directory / CONFIG_NAME
    path.write_bytes(content)
    with warnings.catch_warnings(), within(10):
        warnings.simplefilter("ignore")
        try:
            config, extras = MoEConfig.load(directory)
        except ValueError as err:
            assert str(path) in str(err), str(err)
            return
    assert isinstance(config, MoEConfig) and all(k.startswith("_") for k in extras)
