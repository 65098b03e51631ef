"""`es-mpi score`: rewards for a JSONL of responses, no model and no MPI.
Checked against the paper's own Countdown reward on the 241 reference cases
(tests/data/countdown_reward_examples.json, scored by the reference code)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run
from es_mpi.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "countdown_reward_examples.json"
EXPECTED = ("format_reward", "answer_reward", "reward")


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    assert DATA.is_file(), f"{DATA} is missing"
    cases = json.loads(DATA.read_text(encoding="utf-8"))   # json module: exact big ints
    assert len(cases) == 241
    return cases


def _write_input(path: Path, cases: list[dict]) -> list[dict]:
    """One line per case: the task's fields, the response and extra fields, but
    not the expected rewards; a blank line in the middle is skipped."""
    recs = [{"id": f"case-{i}", "category": c["category"], "numbers": c["numbers"], "target": c["target"],
             "response": c["response"]} for i, c in enumerate(cases)]
    lines = [json.dumps(r) for r in recs]
    lines.insert(5, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return recs


def _cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _check_round_trip(out_text: str, recs: list[dict], cases: list[dict]) -> None:
    out = [json.loads(l) for l in out_text.splitlines()]
    assert len(out) == len(recs)
    bad = []
    for rec, case, got in zip(recs, cases, out):
        assert set(got) == set(rec) | set(EXPECTED)               # every field back, plus the rewards
        assert {k: got[k] for k in rec} == rec
        bad += [(rec["id"], k, got[k], case[k]) for k in EXPECTED if abs(got[k] - case[k]) > 1e-12]
    assert not bad, bad


def test_countdown_round_trip_to_stdout_matches_the_reference(tmp_path, cases):
    # the real command line, as a user runs it
    f = tmp_path / "responses.jsonl"
    recs = _write_input(f, cases)
    p = run([sys.executable, "-m", "es_mpi", "score", "--task", "countdown", "--input", str(f)], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_round_trip(p.stdout, recs, cases)


def test_output_file(tmp_path, cases):
    f, out = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    recs = _write_input(f, cases[:40])
    r = _cli("score", "--task", "countdown", "--input", str(f), "--output", str(out))
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    _check_round_trip(out.read_text(encoding="utf-8"), recs, cases[:40])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "scored.jsonl"]   # no temp file left


@pytest.mark.parametrize("bad_line, message", [
    ('{"numbers": [1, 2], "target": 3, "response": "x"', "malformed JSON"),
    ('[1, 2, 3]', "expected a JSON object"),
    ('{"numbers": [1, 2], "target": 3}', "missing string field 'response'"),
    ('{"numbers": [1, 2], "response": "x"}', "missing field(s) target for task countdown"),
    ('{"numbers": "1 2", "target": 3, "response": "x"}', "field 'numbers' must be a non-empty list"),
])
def test_bad_line_names_its_number_exits_2_and_writes_nothing(tmp_path, bad_line, message):
    f, out = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    good = json.dumps({"numbers": [1, 2], "target": 3, "response": "</think>\n<answer>1+2</answer>"})
    f.write_text("\n".join([good, "", good, bad_line, good]) + "\n", encoding="utf-8")
    r = _cli("score", "--task", "countdown", "--input", str(f), "--output", str(out))
    assert r.exit_code == 2
    assert r.stderr.startswith(f"es-mpi: error: {f}:4: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1                # one line, no traceback
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_malformed_line_from_the_command_line(tmp_path):
    f, out = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    f.write_text('{"answer": "Paris", "response": "Paris"}\n{"answer": "Paris", response: 1}\n', encoding="utf-8")
    p = run([sys.executable, "-m", "es_mpi", "score", "--task", "conciseness", "--input", str(f),
             "--output", str(out)], timeout=120)
    assert p.returncode == 2
    assert f"es-mpi: error: {f}:2: malformed JSON" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()


def test_conciseness(tmp_path):
    f = tmp_path / "in.jsonl"
    recs = [{"question": "What is the capital of France?", "answer": "Paris", "response": "Paris"},
            {"answer": "Paris", "response": "  The capital of France is Paris.\n"},
            {"answer": "Paris", "response": "London"},
            {"answer": "4", "response": ""}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    r = _cli("score", "--task", "conciseness", "--input", str(f))
    assert r.exit_code == 0, r.output
    out = [json.loads(l) for l in r.stdout.splitlines()]
    assert [{k: o[k] for k in recs[i]} for i, o in enumerate(out)] == recs
    # reward = -|len(answer) - len(target)| on the stripped response; contains is case-insensitive
    assert [(o["reward"], o["length"], o["contains"]) for o in out] == [
        (0.0, 5.0, 1.0), (-26.0, 31.0, 1.0), (-1.0, 6.0, 0.0), (-1.0, 0.0, 0.0)]


def test_other_usage_errors(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"answer": "4", "response": "4"}\n', encoding="utf-8")
    r = _cli("score", "--task", "nope", "--input", str(f))
    assert r.exit_code == 2 and "unknown task 'nope'" in r.stderr
    r = _cli("score", "--task", "countdown", "--input", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 2 and "missing.jsonl: input file not found" in r.stderr
    r = _cli("score", "--task", "conciseness", "--input", str(f), "--option", "train_size")
    assert r.exit_code == 2 and "expected KEY=VALUE" in r.stderr
    r = _cli("score", "--task", "conciseness", "--input", str(f), "--option", "foo=1")
    assert r.exit_code == 2 and "unknown key 'foo'" in r.stderr
    # a user task by package.module:Class
    r = _cli("score", "--task", "es_mpi.tasks.arithmetic:MultiplicationTask", "--input", str(tmp_path / "m.jsonl"))
    assert r.exit_code == 2 and "input file not found" in r.stderr
    (tmp_path / "m.jsonl").write_text('{"target": 56, "response": "7 * 8 = 56"}\n', encoding="utf-8")
    r = _cli("score", "--task", "es_mpi.tasks.arithmetic:MultiplicationTask", "--input", str(tmp_path / "m.jsonl"))
    assert r.exit_code == 0 and json.loads(r.stdout)["reward"] == 1.0
