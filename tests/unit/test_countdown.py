"""Countdown: parity with the paper's reward, the safe evaluator, the generator, the task."""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from es_mpi.tasks import TaskDataError, make_task
from es_mpi.tasks.arith_eval import (ExpressionError, answer_reward, countdown_reward, evaluate,
                                     format_reward, last_answer)
from es_mpi.tasks.countdown import generate_puzzles, raw_prompt

ROOT = Path(__file__).resolve().parents[2]


def _reference_file(name: str) -> Path:
    """tests/data first (a copy ships with the tests), then $ES_MPI_REFERENCE_DATA.
    A missing file is a failure, not a skip: parity must always be checked."""
    candidates = [ROOT / "tests" / "data" / name]
    if "ES_MPI_REFERENCE_DATA" in os.environ:
        candidates.append(Path(os.environ["ES_MPI_REFERENCE_DATA"]) / name)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        pytest.fail(f"{name} not found (looked in {', '.join(map(str, candidates))})")
    return found


# ------------------------------------------------------------------ parity
def test_parity_with_reference_on_all_examples():
    path = _reference_file("countdown_reward_examples.json")
    cases = json.loads(path.read_text(encoding="utf-8"))   # json module: exact big ints
    assert len(cases) == 241
    bad = []
    for i, c in enumerate(cases):
        got = countdown_reward(c["response"], c["numbers"], c["target"])
        for key in ("format_reward", "answer_reward", "reward"):
            if abs(got[key] - c[key]) > 1e-12:
                bad.append((i, c["category"], key, got[key], c[key]))
    assert not bad, bad


# The paper's regexes, used here only as the oracle for our linear-time matchers.
def _ref_format(response: str) -> float:
    text = "<think>" + response
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", text, re.DOTALL):
        return 1.0
    return (0.1 if re.search(r"<think>.*?<\/think>", text, re.DOTALL) else 0.0) + \
        (0.5 if re.search(r"<answer>.*?<\/answer>", text, re.DOTALL) else 0.0)


def _ref_last(response: str):
    found = re.findall(r"<answer>(.*?)<\/answer>", response, re.DOTALL)
    return found[-1] if found else None


def test_format_and_answer_extraction_match_reference_regexes():
    rng = random.Random(0)
    parts = ["<think>", "</think>", "<answer>", "</answer>", "\n", "x", "1+2", " ", "<", ">",
             "</answer>\n", "</think>\n<answer>", "answer>", "\n\n"]
    for _ in range(20000):
        s = "".join(rng.choice(parts) for _ in range(rng.randint(0, 8)))
        assert format_reward(s) == _ref_format(s), repr(s)
        assert last_answer(s) == _ref_last(s), repr(s)


# ------------------------------------------------------------------ Python semantics
@pytest.mark.parametrize("expr, value", [
    ("-2**2", -4), ("2**-1", 0.5), ("2**3**2", 512), ("(-2)**2", 4), ("--44 + 19 + 35", 98),
    ("7//2", 3), ("-7//2", -4), ("7/2", 3.5), ("1/3*3", 1.0), ("4 ** -2 * 8", 0.5),
    ("00 + 5", 5), ("((1))", 1), (" 1 + 2", 3), ("1+2\n", 3), ("(1\n+2)", 3), ("2*-3", -6),
    ("-2**-2", -0.25), ("2**-1**2", 0.5), ("10 ** 400 - 10 ** 400", 0),
    ("99999999 * 99999999 + 1", 9999999800000002), ("1 - - 1", 2),
])
def test_python_semantics(expr, value):
    got = evaluate(expr)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("expr", [
    "01", "1 2", "2(3)", "(2)(3)", "()", "() + ()", "1 +", "* 2", "((1)", "(1))", "2 * * 3",
    "2***3", "1///2", "1/0", "1//0", "0**-1", "1\n+2", "1e1", "1.5", "0x25", "2 % 3", "",
    "(" * 201 + "1" + ")" * 201, "2**1024 * 1.0", "__import__('os')",
])
def test_rejected_expressions(expr):
    with pytest.raises(ExpressionError):
        evaluate(expr)


def test_paren_limit_is_cpythons():
    assert evaluate("(" * 200 + "1" + ")" * 200) == 1


def test_complex_and_overflow_score_zero():
    assert isinstance(evaluate("(0 - 8) ** (1 / 3)"), complex)
    assert answer_reward("<answer>(0 - 8) ** (1 / 3)</answer>", [0, 8, 1, 3], 1) == 0.0
    assert answer_reward("<answer>2 ** 1024</answer>", [2, 1024], 0) == 0.0   # float() overflows
    assert answer_reward("<answer>2**3**4</answer>", [2, 3, 4], 2 ** 81) == 1.0


# ------------------------------------------------------------------ adversarial inputs
ADVERSARIAL = [
    ("9**9**9**9", [9, 9, 9, 9], 0),
    ("2**2**2**2**2**2", [2] * 6, 0),
    ("(9**9**9)**0", [9, 9, 9, 0], 1),
    ("9**9999*9**9999", [9, 9999, 9, 9999], 0),
    ("(" * 10000 + "1" + ")" * 10000, [1], 1),
    ("-" * 9000 + "1", [1], -1),
    ("1+" * 500000 + "1", [1] * 500001, 500001),
    ("1 +" + " " * 1_000_000 + "2", [1, 2], 3),
    ("__import__('os').system('echo PWNED')", [], 0),
    ("open('/etc/passwd').read()", [], 0),
    ("[x for x in (38,1,13)]", [38, 1, 13], 51),
    ("(lambda: 1)()", [1], 1),
    ("().__class__.__bases__[0].__subclasses__()", [0], 0),
]


@pytest.mark.parametrize("answer, numbers, target", ADVERSARIAL)
def test_adversarial_answers_score_zero_fast(answer, numbers, target):
    response = f"r</think>\n<answer>{answer}</answer>"
    t0 = time.perf_counter()
    out = countdown_reward(response, numbers, target)
    assert time.perf_counter() - t0 < 0.05
    assert out["answer_reward"] == 0.0


@pytest.mark.parametrize("response", [
    "</think>\n<answer>" * 60000,            # quadratic for the reference's lazy regexes
    "<answer>" * 100000 + "</think>",
    "<think>" * 100000 + "</answer>\n",
    "x" * 1_000_000,
])
def test_pathological_tag_structure_is_linear(response):
    t0 = time.perf_counter()
    countdown_reward(response, [1, 2], 3)
    assert time.perf_counter() - t0 < 0.05


# ------------------------------------------------------------------ generator
def test_generator_is_deterministic_and_solvable():
    a, b = generate_puzzles(60, 7), generate_puzzles(60, 7)
    assert a == b and a != generate_puzzles(60, 8)
    for rec in a:
        assert set(rec) == {"id", "context", "numbers", "target", "solution"}
        assert len(rec["numbers"]) in (3, 4) and all(1 <= x <= 99 for x in rec["numbers"])
        assert isinstance(rec["target"], str) and 1 <= int(rec["target"]) <= 999
        assert rec["context"] == raw_prompt(rec["numbers"], rec["target"])
        assert answer_reward(f"<answer>{rec['solution']}</answer>", rec["numbers"], rec["target"]) == 1.0
    excl = {(tuple(sorted(a[0]["numbers"])), a[0]["target"])}
    assert generate_puzzles(1, 7, exclude=excl)[0]["numbers"] != a[0]["numbers"]


# ------------------------------------------------------------------ the task
def test_default_data_splits_and_prompts():
    t = make_task("countdown", {})
    train, held = t.examples("train"), t.examples("heldout")
    assert (len(train), len(held)) == (200, 2000)
    assert (train[0].id, held[0].id, held[-1].id) == ("0", "200", "2199")
    assert train[0].prompt.endswith("Let me solve this step by step.\n<think>")
    assert train[0].fields == {"numbers": [44, 19, 35], "target": "98"}
    assert t.chat_template is False and t.stop_strings == ("</answer>",)
    s = t.score(train[0], "ok</think>\n<answer>((44 + 19) + 35)</answer>")
    assert (s.reward, s.correct) == (pytest.approx(1.1), True)
    assert t.score(train[0], "ok</think>\n<answer>44 + 19 - 35</answer>").correct is False


def test_options():
    t = make_task("countdown", {"chat_template": True, "train_size": 5, "heldout_size": 7})
    train = t.examples("train")
    assert t.chat_template is True and len(train) == 5 and len(t.examples("heldout")) == 7
    assert train[0].prompt.startswith("Using the numbers [44 19 35]") and "<think>\n" not in train[0].prompt
    with pytest.raises(TaskDataError, match="task.options: unknown key 'foo' for task countdown"):
        make_task("countdown", {"foo": 1})
    with pytest.raises(TaskDataError, match="split"):
        t.examples("test")
    with pytest.raises(TaskDataError, match="train_size"):
        make_task("countdown", {"train_size": "many"})
    gen = make_task("countdown", {"generate": 30, "seed": 2})
    g = gen.examples("train")
    assert len(g) == 30 and g[0].id == "gen2-0" and g == gen.examples("train")


def test_data_file_validation(tmp_path, monkeypatch):
    good = [{"numbers": [1, 2], "target": "3"}, {"numbers": [3, 4], "target": 7, "id": "x"},
            {"numbers": [5, 6], "target": 11.0}]
    p = tmp_path / "cd.json"
    p.write_text(json.dumps(good))
    t = make_task("countdown", {"data": str(p), "train_size": 1})
    assert [e.id for e in t.examples("heldout")] == ["x", "2"]     # no id: position in the file
    assert t.examples("train")[0].prompt == raw_prompt([1, 2], "3")
    monkeypatch.setenv("ES_MPI_COUNTDOWN_DATA", str(p))
    assert len(make_task("countdown", {"train_size": 2}).examples("train")) == 2
    for bad, field in ([{"numbers": "1 2", "target": "3"}], "numbers"), ([{"numbers": [1], "target": "x"}], "target"):
        p.write_text(json.dumps(good + bad))
        with pytest.raises(TaskDataError, match=rf"cd.json: record 3: field '{field}'"):
            make_task("countdown", {"data": str(p)}).examples("train")
    jl = tmp_path / "cd.jsonl"
    jl.write_text('{"numbers": [1, 2], "target": "3"}\n{"numbers": [true], "target": "3"}\n')
    with pytest.raises(TaskDataError, match=r"cd.jsonl:2: field 'numbers'"):
        make_task("countdown", {"data": str(jl)}).examples("train")
    with pytest.raises(TaskDataError, match="not found"):
        make_task("countdown", {"data": str(tmp_path / "missing.json")}).examples("train")
    t = make_task("countdown", {})
    with pytest.raises(TaskDataError, match="r.jsonl:3: field 'numbers'"):
        t.from_record({"numbers": [1.5], "target": "3"}, where="r.jsonl:3")
