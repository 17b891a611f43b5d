"""The run configuration: what a `moetune train` YAML may say, checked before anything loads.

The YAML holds `moe` (MoEConfig fields), `data` (DataConfig), `training` (transformers'
TrainingArguments fields, coerced to their types), `model` (ModelLoad: a local directory, a Hub id, or
"smollm2" for the offline demo model) and optionally `stages` (continual learning). Unknown keys are
errors: a typo must not silently train something else. Paths resolve from the YAML's folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from transformers import TrainingArguments

from moetune.app.data import (
    KNOWN_KEYS,
    PROMPT_KEYS,
    RESPONSE_KEYS,
    DataError,
    Example,
    load_examples,
    read_records,
)
from moetune.config import MoEConfig, short_repr

# libyaml's safe loader where installed: linear time and a nesting limit (PyYAML's pure-Python scanner
# spends seconds on a few thousand nested brackets); the same YAML 1.1 types either way
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """A bad run configuration; the message names the key and what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={short_repr(value)}: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# record format -> the keys its records must have (one of each group)
RECORD_FORMATS: dict[str, tuple[tuple[str, ...], ...]] = {
    "prompt_response": (PROMPT_KEYS, RESPONSE_KEYS),
    "messages": (("messages",),),
    "alpaca": (("instruction",), ("output",)),
    "sharegpt": (("conversations",),),
}


@dataclass
class DataSource:
    path: str | None = field(
        default=None,
        metadata={
            "help": "A .jsonl/.json/.csv file of prompt/response, messages, Alpaca or ShareGPT records."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Instead of a file: a dataset through datasets.load_dataset (a Hub id, or a local "
            "directory, also one written by save_to_disk), in the same record formats."
        },
    )
    config: str | None = field(default=None, metadata={"help": "With dataset: its configuration (subset)."})
    split: str = field(default="train", metadata={"help": "With dataset: the split to read."})
    columns: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "With dataset: its columns renamed to moetune's record keys, e.g. {question: prompt, "
            "answer: response}; columns that are no record key are ignored."
        },
    )
    format: str | None = field(
        default=None,
        metadata={
            "help": "The records' format, checked on every record: prompt_response, messages, alpaca "
            "(instruction/input/output) or sharegpt (conversations of from/value); null: told apart by "
            "their keys."
        },
    )
    task: str | None = field(default=None, metadata={"help": "Task name for records without a task field."})
    weight: float = field(default=1.0, metadata={"help": "Sampling weight of this task in the mixture."})
    only_tasks: list[str] | None = field(
        default=None, metadata={"help": "Keep only the records of these tasks (e.g. one task per stage)."}
    )

    def __post_init__(self) -> None:
        _require(
            (self.path is None) != (self.dataset is None),
            "path",
            self.path,
            "give a path (a file) or a dataset (a Hub id or a dataset directory), one of them",
        )
        for key in ("path", "dataset", "config"):
            value = getattr(self, key)
            _require(
                value is None or (isinstance(value, str) and value != ""), key, value, "must be a string"
            )
        _require(
            isinstance(self.split, str) and self.split != "", "split", self.split, "must be a split name"
        )
        fmt = self.format
        _require(fmt is None or fmt in RECORD_FORMATS, "format", fmt, f"allowed: {', '.join(RECORD_FORMATS)}")
        cols = self.columns
        ok = cols is None or (isinstance(cols, dict) and all(isinstance(v, str) for v in cols.values()))
        _require(ok, "columns", cols, "must map dataset columns to record keys")
        _require(self.task is None or isinstance(self.task, str), "task", self.task, "must be a string")
        _require(_is_number(self.weight) and self.weight > 0, "weight", self.weight, "must be a number > 0")
        only = self.only_tasks
        ok = only is None or (isinstance(only, list) and bool(only) and all(isinstance(t, str) for t in only))
        _require(ok, "only_tasks", only, "must be a non-empty list of task names")

    @property
    def where(self) -> str:
        return self.path or f"dataset {self.dataset}" + (f" ({self.config})" if self.config else "")

    def examples(self) -> list[Example]:
        """The file's or dataset's examples (of `only_tasks`, if given)."""
        records = read_records(self.path) if self.path is not None else dataset_records(self)
        if self.format is not None:
            needed = RECORD_FORMATS[self.format]
            for i, record in enumerate(records, 1):
                if not (isinstance(record, dict) and all(any(k in record for k in keys) for keys in needed)):
                    have = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{self.where} record {i}: format={self.format!r} needs the keys "
                        f"{' and '.join('/'.join(keys) for keys in needed)}; it has {have}"
                    )
        examples = load_examples(records, default_task=self.task or "default", where=self.where)
        if self.only_tasks is None:
            return examples
        kept = [ex for ex in examples if ex.task in self.only_tasks]
        if not kept:
            raise DataError(f"{self.where}: no record of the tasks {self.only_tasks}")
        return kept


def dataset_records(src: DataSource) -> list[dict[str, Any]]:
    """The records of `src.dataset`'s split: columns renamed by `src.columns`, those that are no record
    key dropped (Hub datasets carry extra columns, e.g. Alpaca's `text`)."""
    import datasets

    name = src.dataset
    try:
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
            data = datasets.load_from_disk(name)[src.split]
        elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
            data = datasets.load_from_disk(name)
        else:
            try:
                data = datasets.load_dataset(name, src.config, split=src.split)
            except ConnectionError:  # offline (HF_HUB_OFFLINE): the Hub cache's snapshot, if there is one
                from huggingface_hub import snapshot_download

                local = snapshot_download(name, repo_type="dataset", local_files_only=True)
                data = datasets.load_dataset(local, src.config, split=src.split)
    except KeyError:
        splits = list(datasets.load_from_disk(name))
        raise DataError(f"{src.where}: no split {src.split!r}; it has {splits}") from None
    except ValueError as err:
        message = " ".join(str(err).split())
        if "split" in message.lower():
            raise DataError(f"{src.where}: split={src.split!r}: {message[:300]}") from None
        raise DataError(f"{src.where}: {message[:300]}") from None
    except (OSError, FileNotFoundError) as err:
        raise DataError(f"{src.where}: cannot load it ({' '.join(str(err).split())[:300]})") from None
    columns = src.columns or {}
    missing = sorted(set(columns) - set(data.column_names))
    if missing:
        raise DataError(f"{src.where}: columns {missing} not in the dataset; it has {data.column_names}")
    keys = KNOWN_KEYS | {"conversations"}
    return [{columns.get(k, k): v for k, v in row.items() if columns.get(k, k) in keys} for row in data]


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list, metadata={"help": "Training files."})
    test: list[DataSource] = field(default_factory=list, metadata={"help": "Held-out files, per task."})
    validation: list[DataSource] = field(
        default_factory=list,
        metadata={
            "help": "Validation files: their loss per task (eval_<task>_loss, and eval_loss, the mean over "
            "tasks) and routing, whenever training.eval_strategy says; what load_best_model_at_end and "
            "metric_for_best_model read."
        },
    )
    validation_split: float = field(
        default=0.0,
        metadata={
            "help": "Instead of validation files: this fraction of each task's training records (at least "
            "one, drawn with a fixed seed) is held out as validation data, never trained on."
        },
    )
    train_size: int | None = field(
        default=None,
        metadata={
            "help": "With balance_tasks: examples in the mixture (null = as many as there are records)."
        },
    )
    deduplicate: bool = field(
        default=False,
        metadata={"help": "Drop training records whose prompt repeats an earlier one of the same task."},
    )
    drop_test_overlap: bool = field(
        default=False,
        metadata={"help": "Drop training records whose prompt is also a test item's."},
    )
    allow_untrained_test_tasks: bool = field(
        default=False,
        metadata={
            "help": "Score test tasks that no training record has (e.g. to measure transfer). Off: such a "
            "task is an error, as a misspelt task name usually is."
        },
    )
    balance_tasks: bool = field(
        default=False,
        metadata={
            "help": "Resample the tasks to shares of train_size by their files' weight (a small task's "
            "records repeated, a large one's cut), shuffled with the seed. Off: every record trains once "
            "per epoch, in the order the Trainer shuffles."
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens per example (prompts are cut from the left)."}
    )
    options: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={
            "help": "Per task: answer options scored by log-likelihood; tasks without are exact match."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Train on each batch's examples concatenated into one row with position ids that restart "
            "per example, instead of padding them to the longest (TRL's padding_free): the same loss without "
            "the padding's compute. Needs an attention implementation that reads packed position ids (sdpa "
            "and eager in transformers 5, flash-attention). With route_by_task the batch names the task "
            "of each packed example."
        },
    )
    label_logits_only: bool = field(
        default=True,
        metadata={
            "help": "With padding_free: compute the output head only at the positions that predict a label "
            "token (the model's logits_to_keep, with the labels as shift_labels), not at every prompt "
            "position. The same loss and gradients, less time and memory: a 49k-token vocabulary's head is "
            "about a fifth of a 135M model's compute. Needs a causal LM whose forward takes logits_to_keep "
            "(transformers' do)."
        },
    )

    def __post_init__(self) -> None:
        size = self.train_size
        _require(
            size is None or (_is_int(size) and size >= 1), "train_size", size, "must be an int >= 1 or null"
        )
        n = self.max_length
        _require(_is_int(n) and n >= 1, "max_length", n, "must be an int >= 1")
        options_ok = isinstance(self.options, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(o, str) for o in v)
            for k, v in self.options.items()
        )
        _require(options_ok, "options", self.options, "must map each task to a list of answer strings")
        if not self.balance_tasks:
            _require(size is None, "train_size", size, "needs balance_tasks: true (or leave it out)")
            weighted = [src.where for src in self.train if src.weight != 1.0]
            _require(not weighted, "weight", weighted, "of a training file needs balance_tasks: true")
        split = self.validation_split
        ok = _is_number(split) and 0 <= split < 1
        _require(ok, "validation_split", split, "must be a number in [0, 1)")
        _require(not (split and self.validation), "validation_split", split, "or validation files, not both")
        switches = (
            "padding_free",
            "label_logits_only",
            "deduplicate",
            "drop_test_overlap",
            "balance_tasks",
            "allow_untrained_test_tasks",
        )
        for name in switches:
            value = getattr(self, name)
            _require(isinstance(value, bool), name, value, "must be true or false")


@dataclass
class AddExperts:
    num_experts: int = field(metadata={"help": "Routed experts to append to every MoE layer."})
    task: str = field(metadata={"help": "The new task that owns them."})
    freeze_existing: bool = field(default=True, metadata={"help": "Freeze everything trained before."})

    def __post_init__(self) -> None:
        n = self.num_experts
        _require(_is_int(n) and n >= 1, "num_experts", n, "must be an int >= 1")
        _require(isinstance(self.task, str) and self.task != "", "task", self.task, "must be a task name")
        ok = isinstance(self.freeze_existing, bool)
        _require(ok, "freeze_existing", self.freeze_existing, "must be true or false")


@dataclass
class StageConfig:
    """One stage of a continual-learning run: optionally new experts, then training on its own data."""

    data: DataConfig = field(metadata={"help": "The stage's training files (and held-out files, if any)."})
    name: str | None = field(default=None, metadata={"help": "A label for reports; default stage-<n>."})
    add_experts: AddExperts | None = field(
        default=None, metadata={"help": "Experts for a new task, appended before this stage trains."}
    )
    training: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "TrainingArguments fields for this stage, over `training`."}
    )


MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
QUANTIZATIONS = {  # name -> the package it needs
    "bnb-4bit": "bitsandbytes",
    "bnb-8bit": "bitsandbytes",
    "torchao-int8": "torchao",
}


@dataclass
class ModelLoad:
    """How the base model loads (transformers' from_pretrained): the YAML's `model` as a mapping, with
    `name_or_path` beside these keys."""

    revision: str | None = field(default=None, metadata={"help": "A Hub branch, tag or commit."})
    dtype: str = field(
        default="float32",
        metadata={"help": "The base weights' dtype: float32, bfloat16, float16, or auto (the checkpoint's)."},
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "bnb-4bit (QLoRA's NF4, double quantization, bfloat16 compute), bnb-8bit, or "
            "torchao-int8 (int8 weight-only). The experts stay in full precision."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa, eager, flash_attention_2, ... (default: transformers')."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run code from the model's repository: only for a repository you trust."},
    )

    def __post_init__(self) -> None:
        rev = self.revision
        _require(rev is None or (isinstance(rev, str) and rev != ""), "revision", rev, "must be a string")
        _require(self.dtype in MODEL_DTYPES, "dtype", self.dtype, f"allowed: {', '.join(MODEL_DTYPES)}")
        q = self.quantization
        _require(q is None or q in QUANTIZATIONS, "quantization", q, f"allowed: {', '.join(QUANTIZATIONS)}")
        attn = self.attn_implementation
        _require(attn is None or isinstance(attn, str), "attn_implementation", attn, "must be a string")
        trust = self.trust_remote_code
        _require(isinstance(trust, bool), "trust_remote_code", trust, "must be true or false")

    def check_installed(self) -> None:
        """The quantization's package is installed (before a model loads)."""
        package = QUANTIZATIONS.get(self.quantization or "")
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"model.quantization={self.quantization!r}: needs the {package} package "
                f"(pip install {package})"
            )

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": "auto" if self.dtype == "auto" else getattr(torch, self.dtype),
        }
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantization in ("bnb-4bit", "bnb-8bit"):
            from transformers import BitsAndBytesConfig

            four = self.quantization == "bnb-4bit"
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=four,
                load_in_8bit=not four,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        elif self.quantization == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            kwargs["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
        return kwargs


@dataclass
class RunConfig:
    model: str = "smollm2"
    model_load: ModelLoad = field(
        default_factory=ModelLoad,
        metadata={"help": "How `model` loads: the YAML's `model` mapping's keys besides name_or_path."},
    )
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)
    router_lr_multiplier: float = 1.0
    seed: int = 0
    route_by_task: bool = field(
        default=False,
        metadata={
            "help": "Give the model each example's task (task_ids in training, use_tasks in evaluation); "
            "the data's tasks must be the model's. Always on with moe.task_routing."
        },
    )
    stages: list[StageConfig] = field(
        default_factory=list,
        metadata={
            "help": "Continual learning: stages trained one after the other (each may add experts for a "
            "new task); `data.test` is evaluated after each. Empty: one run on `data.train`."
        },
    )

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and self.model != "", "model", self.model, "must be a string")
        _require(isinstance(self.training, dict), "training", self.training, "must be a mapping")
        mult = self.router_lr_multiplier
        _require(_is_number(mult) and mult > 0, "router_lr_multiplier", mult, "must be a number > 0")
        _require(_is_int(self.seed), "seed", self.seed, "must be an int")
        ok = isinstance(self.route_by_task, bool)
        _require(ok, "route_by_task", self.route_by_task, "must be true or false")

    @property
    def routes_by_task(self) -> bool:
        return self.route_by_task or self.moe.task_routing != "none"


def _strict(cls: type, raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys may be ints, null, dates...
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw
    )
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    return raw


def _build(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    """cls(**kwargs), its ConfigError prefixed with where the values came from."""
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def parse_run_config(raw: Any, where: str = "config") -> RunConfig:
    raw = _strict(RunConfig, raw, where)
    try:
        moe = MoEConfig(**_strict(MoEConfig, raw.get("moe"), f"{where}: moe"))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{where}: moe: {err}") from None
    data = _parse_data(raw.get("data"), f"{where}: data")
    training = _parse_training(raw.get("training"), f"{where}: training")
    stages_raw = raw.get("stages") or []
    if not isinstance(stages_raw, list):
        raise ConfigError(f"{where}: stages: expected a list of stages, got {short_repr(stages_raw)}")
    stages = [_parse_stage(s, f"{where}: stages[{i}]") for i, s in enumerate(stages_raw)]
    if not data.train and not stages:
        raise ConfigError(f"{where}: data.train: no training files given")
    if data.train and stages:
        raise ConfigError(f"{where}: data.train: with stages, each stage names its training files")
    rest = {k: v for k, v in raw.items() if k not in ("moe", "data", "training", "stages")}
    if "model_load" in rest:
        raise ConfigError(f"{where}: model_load: give these keys in the `model` mapping")
    if isinstance(rest.get("model"), dict):
        spec = dict(rest["model"])
        if "name_or_path" not in spec:
            raise ConfigError(f"{where}: model: missing key 'name_or_path' (a Hub id or a local directory)")
        rest["model"] = spec.pop("name_or_path")
        rest["model_load"] = _build(ModelLoad, _strict(ModelLoad, spec, f"{where}: model"), f"{where}: model")
    return _build(
        RunConfig, {"moe": moe, "data": data, "training": training, "stages": stages, **rest}, where
    )


def _parse_data(raw: Any, where: str) -> DataConfig:
    data_raw = dict(_strict(DataConfig, raw, where))
    for split in ("train", "test", "validation"):
        items = data_raw.get(split) or []
        if isinstance(items, (str, dict)):
            items = [items]
        if not isinstance(items, list):
            raise ConfigError(
                f"{where}.{split}: expected a file path or a list of them, got {short_repr(items)}"
            )
        data_raw[split] = [
            _build(
                DataSource,
                {"path": i} if isinstance(i, str) else _strict(DataSource, i, f"{where}.{split}"),
                f"{where}.{split}",
            )
            for i in items
        ]
    return _build(DataConfig, data_raw, where)


def _parse_training(raw: Any, where: str) -> dict[str, Any]:
    training = raw or {}
    if not isinstance(training, dict):
        raise ConfigError(f"{where}: expected a mapping of TrainingArguments fields")
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(training) - known, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown TrainingArguments field(s) {unknown}")
    return {key: _training_value(key, value, where) for key, value in training.items()}


def _training_value(key: str, value: Any, where: str) -> Any:
    """A TrainingArguments value from YAML, as the field's type wants it: YAML 1.1 reads `1e-3` (no dot)
    as a string, which TrainingArguments would keep and the optimizer fail on minutes later."""
    types = _field_types(key)
    if not {int, float} & types or value is None:
        return value
    if _is_number(value) and (float in types or isinstance(value, int) or value.is_integer()):
        return value if float in types or isinstance(value, int) else int(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and float in types:
            return number
        if number is not None and number.is_integer():
            return int(number)
        if types - {int, float, type(None)}:  # a field that also takes a string or an enum
            return value
    kind = "a number" if float in types else "an integer"
    raise ConfigError(f"{where}.{key}={short_repr(value)}: must be {kind}")


def _field_types(key: str) -> set[type]:
    """The plain types a TrainingArguments field accepts (`float | None` -> {float, NoneType})."""
    hint = typing.get_type_hints(TrainingArguments)[key]
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    members = typing.get_args(hint) if union else (hint,)
    return {t for t in members if isinstance(t, type)}


def _parse_stage(raw: Any, where: str) -> StageConfig:
    raw = dict(_strict(StageConfig, raw, where))
    raw["data"] = _parse_data(raw.get("data"), f"{where}: data")
    if not raw["data"].train:
        raise ConfigError(f"{where}: data.train: no training files given")
    raw["training"] = _parse_training(raw.get("training"), f"{where}: training")
    if raw.get("add_experts") is not None:
        add = _strict(AddExperts, raw["add_experts"], f"{where}: add_experts")
        raw["add_experts"] = _build(AddExperts, add, f"{where}: add_experts")
    name = raw.get("name")
    _require(
        name is None or (isinstance(name, str) and name != ""), f"{where}: name", name, "must be a string"
    )
    return _build(StageConfig, raw, where)


def load_run_config(path: str | os.PathLike) -> RunConfig:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.load(fh, Loader=YAML_LOADER)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
        except (yaml.YAMLError, ValueError, OverflowError) as err:  # ValueError: a bad date, a huge int
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    cfg = parse_run_config(raw, path)
    resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    return cfg


def resolve_paths(cfg: RunConfig, folder: str) -> None:
    """Relative paths in a YAML are from the YAML's folder, wherever the command runs: every data file,
    and the model when that folder holds a directory of its name (else it stays a name: the demo's)."""
    for data in (cfg.data, *(stage.data for stage in cfg.stages)):
        for src in (*data.train, *data.test, *data.validation):
            if src.path is not None:
                src.path = os.path.normpath(os.path.join(folder, src.path))
            elif not os.path.isabs(src.dataset) and os.path.isdir(os.path.join(folder, src.dataset)):
                src.dataset = os.path.normpath(os.path.join(folder, src.dataset))
    if not os.path.isabs(cfg.model) and os.path.isdir(os.path.join(folder, cfg.model)):
        cfg.model = os.path.normpath(os.path.join(folder, cfg.model))
