"""Configuration: frozen dataclasses per component, YAML in, `--set a.b=v` overrides.

Every key has a default here; `configs/defaults.yaml` documents them (a test
checks the two agree).  Validation runs before anything heavy loads, and every
error names the field and the bad value.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError


@dataclass(frozen=True)
class ESConfig:
    population: int = 8            # N, members per generation
    sigma: float = 0.001           # noise scale
    alpha: float = 5e-4            # learning rate
    seed: int = 0                  # run seed: all noise and prompt batches derive from it
    generations: int = 10          # total generations of the run
    antithetic: bool = False       # members 2k, 2k+1 share noise with opposite signs
    shaping: str = "zscore"        # zscore | centered_rank | raw
    step: str = "paper"            # paper: alpha/N * sum z eps ; gradient: alpha/(N sigma) * sum z eps
    optimizer: str = "sgd"         # sgd | adam
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    adam_state: str = "auto"       # auto | device | host: where Adam's fp32 moments live (host: pinned, streamed)
    master: str = "auto"           # auto | device | host: where the fp32 master lives (host: pinned, streamed)
    prompts_per_generation: int = 8  # prompts every member is scored on, per generation
    check_every: int = 10          # cross-rank weight digest check every K generations (0: start/end only)
    noise: str = "full"            # full: every weight gets its own noise | lowrank: E = A B^T / sqrt(rank) (EGGROLL)
    rank: int = 1                  # r of the low-rank perturbations
    lowrank_scope: str = "layers"  # layers: decoder-layer matrices | all: also embeddings, LM head, norms, biases


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:tiny"     # hub id | local HF folder | file.gguf | pkg:<package>/<file> | builtin:tiny
    dtype: str = "auto"            # working dtype: auto | fp32 | bf16 | fp16 (master is always fp32)
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch threads per rank; 0 = node cores / ranks on the node
    tiny_seed: int = 0             # init seed of builtin:tiny
    cache_dir: str = ""            # where converted models go; "" = $ES_MPI_CACHE or ~/.cache/es-mpi


@dataclass(frozen=True)
class TaskConfig:
    name: str = "toy"              # built-in name or package.module:Class
    data: str = ""                 # dataset file, if the task takes one
    train_size: int = 0            # 0 = task default
    heldout_size: int = 0          # 0 = task default
    seed: int = 0                  # seed of generated datasets
    chat_template: str = "auto"    # auto (task decides) | true | false
    reward_timeout: float = 5.0    # seconds per reward call before the member is marked invalid
    options: Mapping[str, Any] = field(default_factory=dict)  # task-specific keys


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    batch_size: int = 0            # rows per decode tile (the unit dealt to ranks); 0 = one member's prompts
    backend: str = "auto"          # decoder: auto (vllm on CUDA when vLLM imports, else hf) | hf | vllm
    kv_cache_gb: int = 1           # vllm on CPU: KV-cache size per rank, GiB (VLLM_CPU_KVCACHE_SPACE)
    vllm_mode: str = "auto"        # vllm: auto (compiled when the run is long enough to pay) | eager | compiled


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                 # held-out evaluation every K generations (0: start and end only if limit>0)
    limit: int = 0                 # held-out prompts at the start and the end; 0 disables held-out eval
    subset: int = 0                # prompts in the periodic evaluations between (the first ones); 0 = limit


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0                 # write a checkpoint every K generations (0: only at the end)
    keep: int = 3                  # newest checkpoints kept (the final one is always kept)


@dataclass(frozen=True)
class Config:
    es: ESConfig = field(default_factory=ESConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_CHOICES = {
    "es.shaping": ("zscore", "centered_rank", "raw"),
    "es.step": ("paper", "gradient"),
    "es.optimizer": ("sgd", "adam"),
    "es.adam_state": ("auto", "device", "host"),
    "es.master": ("auto", "device", "host"),
    "es.noise": ("full", "lowrank"),
    "es.lowrank_scope": ("layers", "all"),
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "model.device": ("auto", "cpu", "cuda"),
    "task.chat_template": ("auto", "true", "false"),
    "generation.backend": ("auto", "hf", "vllm"),
    "generation.vllm_mode": ("auto", "eager", "compiled"),
}
# field -> (predicate, description of the valid range)
_RANGES = {
    "es.population": (lambda v: v >= 2, ">= 2"),
    "es.sigma": (lambda v: v > 0, "> 0"),
    "es.alpha": (lambda v: v > 0, "> 0"),
    "es.generations": (lambda v: v >= 0, ">= 0"),
    "es.prompts_per_generation": (lambda v: v >= 1, ">= 1"),
    "es.check_every": (lambda v: v >= 0, ">= 0"),
    "es.rank": (lambda v: v >= 1, ">= 1"),
    "es.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "es.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "es.adam_eps": (lambda v: v > 0, "> 0"),
    "model.threads": (lambda v: v >= 0, ">= 0"),
    "task.train_size": (lambda v: v >= 0, ">= 0"),
    "task.heldout_size": (lambda v: v >= 0, ">= 0"),
    "task.reward_timeout": (lambda v: v > 0, "> 0"),
    "generation.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "generation.batch_size": (lambda v: v >= 0, ">= 0"),
    "generation.kv_cache_gb": (lambda v: v >= 1, ">= 1"),
    "eval.every": (lambda v: v >= 0, ">= 0"),
    "eval.limit": (lambda v: v >= 0, ">= 0"),
    "eval.subset": (lambda v: v >= 0, ">= 0"),
    "checkpoint.every": (lambda v: v >= 0, ">= 0"),
    "checkpoint.keep": (lambda v: v >= 1, ">= 1"),
}
# Fields that change the trajectory: resuming with a different value needs --force.
TRAJECTORY_FIELDS = (
    "es.population", "es.sigma", "es.alpha", "es.seed", "es.antithetic", "es.shaping", "es.step",
    "es.optimizer", "es.adam_beta1", "es.adam_beta2", "es.adam_eps", "es.prompts_per_generation",
    "es.noise", "es.rank", "es.lowrank_scope", "generation.batch_size",
    "model.path", "model.dtype", "model.tiny_seed", "task.name", "task.data", "task.train_size",
    "task.seed", "task.chat_template", "task.options", "generation.max_new_tokens",
)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one value to the field's declared type; errors name the field."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads `5e-4` as a string; accept what is plainly a number.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        raise UserError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, bool):  # YAML `true` for chat_template
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    # Mapping[str, Any]
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def from_dict(data: Mapping[str, Any] | None, source: str = "config") -> Config:
    data = dict(data or {})
    sections = {}
    hints = typing.get_type_hints(Config)
    for key in data:
        if key not in hints:
            raise UserError(f"{source}: unknown section {key!r} (known: {', '.join(hints)})")
    for sec_name, sec_type in hints.items():
        raw = data.get(sec_name) or {}
        if not isinstance(raw, Mapping):
            raise UserError(f"{source}: {sec_name}: expected a mapping, got {raw!r}")
        sec_hints = typing.get_type_hints(sec_type)
        kwargs = {}
        for key, value in raw.items():
            where = f"{sec_name}.{key}"
            if key not in sec_hints:
                raise UserError(f"{source}: unknown key {where!r} (known in {sec_name}: {', '.join(sec_hints)})")
            typ = sec_hints[key]
            typ = typ if typ in (bool, int, float, str) else Mapping
            kwargs[key] = _coerce(value, typ, f"{source}: {where}")
        sections[sec_name] = sec_type(**kwargs)
    cfg = Config(**sections)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    for sec in fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in fields(obj):
            key = f"{sec.name}.{f.name}"
            value = getattr(obj, f.name)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise UserError(f"{source}: {key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
            if key in _RANGES:
                ok, desc = _RANGES[key]
                if not ok(value):
                    raise UserError(f"{source}: {key}: {value!r} is out of range (must be {desc})")
    if cfg.es.antithetic and cfg.es.population % 2:
        raise UserError(f"{source}: es.population: {cfg.es.population} must be even with es.antithetic: true")
    if not cfg.model.path:
        raise UserError(f"{source}: model.path: must not be empty")


def with_value(cfg: Config, key: str, value: Any) -> Config:
    """A copy of `cfg` with one dotted key replaced (e.g. model.dtype once
    `auto` is resolved), validated again."""
    sec, name = key.split(".", 1)
    out = dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **{name: value})})
    validate(out)
    return out


def parse_set(items: list[str] | tuple[str, ...]) -> dict:
    """`a.b=v` overrides -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {key} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "options":
            out[k] = _merge(dict(out[k]), v)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read config ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a YAML mapping of sections, got {type(data).__name__}")
    return data


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    data = _merge(data, parse_set(overrides))
    return from_dict(data, source)


def loads(text: str, source: str = "config") -> Config:
    return from_dict(yaml.safe_load(text) or {}, source)


def diff(a: Config, b: Config, keys: tuple[str, ...] | None = None) -> list[str]:
    """Dotted keys where two configs differ (restricted to `keys` if given)."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for sec in da:
        for k in da[sec]:
            key = f"{sec}.{k}"
            if (keys is None or key in keys) and da[sec][k] != db[sec][k]:
                out.append(key)
    return out
