"""generation.vllm_mode (issue 17): eager or compiled by the run's length,
decided on quantities every rank count shares, and kept across a resume."""
from __future__ import annotations

from es_mpi import config as config_mod
from es_mpi.decode.backend import COMPILE_PAYS_TOKENS, choose_mode, run_tokens
from es_mpi.trainer import keep_saved_mode


def _cfg(*sets):
    return config_mod.load(None, list(sets))


def test_run_tokens_is_the_whole_runs_decode_budget():
    cfg = _cfg("es.generations=10", "es.population=30", "es.prompts_per_generation=16",
               "generation.max_new_tokens=256")
    assert run_tokens(cfg) == 10 * 30 * 16 * 256


def test_auto_compiles_only_when_the_run_is_long_enough_on_each_device():
    for dev, kind in (("cpu", "cpu"), ("cuda:0", "cuda")):
        limit = COMPILE_PAYS_TOKENS[kind]
        assert choose_mode("auto", dev, limit - 1)[0] == "eager"
        mode, why = choose_mode("auto", dev, limit)
        assert mode == "compiled" and f"{limit:,}" in why
    assert COMPILE_PAYS_TOKENS["cpu"] > COMPILE_PAYS_TOKENS["cuda"]   # the CPU's compile gains little
    for pref in ("eager", "compiled"):
        assert choose_mode(pref, "cpu", 10**12)[0] == pref and choose_mode(pref, "cuda", 1)[0] == pref


def test_the_paper_run_compiles_and_the_tiny_demo_does_not():
    paper = _cfg("es.generations=1000", "es.population=30", "es.prompts_per_generation=200",
                 "generation.max_new_tokens=1024")
    tiny = config_mod.load("configs/tiny.yaml", [])
    assert choose_mode("auto", "cpu", run_tokens(paper))[0] == "compiled"
    assert choose_mode("auto", "cpu", run_tokens(tiny))[0] == "eager"


def test_a_resume_keeps_the_mode_its_run_started_with(tmp_path):
    """auto reads es.generations, which a resume may extend: the run keeps its
    newest checkpoint's mode instead of re-deciding."""
    from es_mpi.comm import serial
    from es_mpi.trainer import Trainer

    run = tmp_path / "run"
    tr = Trainer(config_mod.load("configs/tiny.yaml", ["es.generations=1", "eval.limit=0"]), serial(), run)
    assert tr.cfg.generation.vllm_mode == "eager"
    assert tr.run() == 0
    longer = config_mod.load("configs/tiny.yaml", ["es.generations=100000"])
    assert choose_mode("auto", "cpu", run_tokens(longer))[0] == "compiled"
    assert keep_saved_mode(longer, run).generation.vllm_mode == "eager"
    assert keep_saved_mode(longer, tmp_path / "empty").generation.vllm_mode == "auto"   # no checkpoint yet
