"""The generated and file-based built-in tasks: sequence, arithmetic, math, sudoku, conciseness."""
from __future__ import annotations

import json
import re
import time

import pytest

from es_mpi.tasks import Example, TaskDataError, make_task
from es_mpi.tasks.arithmetic import last_integer
from es_mpi.tasks.math_boxed import answers_match, last_boxed, normalize
from es_mpi.tasks.sudoku import count_solutions


def _ids_prompts(examples):
    return [(e.id, e.prompt, dict(e.fields)) for e in examples]


# ------------------------------------------------------------------ sequence / arithmetic
@pytest.mark.parametrize("name", ["sequence", "arithmetic"])
def test_generated_tasks_deterministic_disjoint_valid(name):
    a, b = make_task(name, {}), make_task(name, {})
    train, held = a.examples("train"), a.examples("heldout")
    assert (len(train), len(held)) == (200, 200) and a.chat_template is True
    assert _ids_prompts(train) == _ids_prompts(b.examples("train"))
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    assert _ids_prompts(train) != _ids_prompts(make_task(name, {"seed": 1}).examples("train"))
    assert len({e.id for e in train + held}) == 400
    for e in train + held:
        nums = [int(x) for x in re.findall(r"\d+", e.prompt)]
        want = nums[0] * nums[1] if name == "arithmetic" else 2 * nums[4] - nums[3]
        assert e.fields["target"] == want
        assert a.score(e, f"The answer is {want}.").correct


@pytest.mark.parametrize("text, value", [
    ("42", 42), ("The answer is 1,234.", 1234), ("so -5", -5), ("3-5", 5), ("x = \u221212", -12),
    ("12,34", 34), ("42.0", 42), ("42.5", None), ("no number", None), ("first 41, then 42", 42),
    ("\u0664\u0662", None), ("9" * 500, None), ("1,234,567", 1234567),
])
def test_last_integer_rule(text, value):
    assert last_integer(text) == value


def test_integer_scoring_cases():
    t = make_task("arithmetic", {})
    ex = Example("x", "What is 7 * 43?", {"target": 301})
    cases = {"301": 1.0, "7 * 43 = 301": 1.0, "It is 301, I think": 1.0, "301 or maybe 300": 0.0,
             "three hundred and one": 0.0, "": 0.0, "301.5": 0.0, "-301": 0.0, "3,01": 0.0,
             "<answer>301</answer>": 1.0}
    for text, want in cases.items():
        s = t.score(ex, text)
        assert s.reward == want and s.components == {"answer_reward": want}, text
    t0 = time.perf_counter()
    assert t.score(ex, "1" * 1_000_000 + " 301").reward == 1.0
    assert t.score(ex, "-" * 1_000_000).reward == 0.0
    assert time.perf_counter() - t0 < 1.0


def test_generated_task_options():
    with pytest.raises(TaskDataError, match="task.options: unknown key 'foo' for task sequence"):
        make_task("sequence", {"foo": 1})
    with pytest.raises(TaskDataError, match="train_size: at most"):
        make_task("arithmetic", {"train_size": 10_000}).examples("train")
    with pytest.raises(TaskDataError, match="task.options.data"):
        make_task("arithmetic", {"data": "x.jsonl"})
    t = make_task("sequence", {"chat_template": False, "train_size": 3, "heldout_size": 0})
    assert t.chat_template is False and len(t.examples("train")) == 3
    assert len(t.examples("heldout")) == 200          # 0 = default, as the config writes it
    with pytest.raises(TaskDataError, match="split"):
        t.examples("validation")
    assert t.from_record({"target": 5, "response": "5"}).fields == {"target": 5}


# ------------------------------------------------------------------ math
@pytest.mark.parametrize("pred, ref, same", [
    ("5", "5", True), ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "3/4", True),
    ("\\tfrac12", "0.5", True), ("18 \\text{ dollars}", "18", True), ("\\$1,234.50", "1234.5", True),
    ("x = 7", "7", True), ("10\\%", "10", True), ("90^\\circ", "90", True), ("5 cm^2", "5", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True), ("3\\frac{1}{2}", "7/2", True), ("1{,}000", "1000", True),
    ("1\\,000", "1000", True), ("-\\frac{1}{3}", "-1/3", True), ("\\textbf{42}", "42", True),
    ("2\\sqrt{3}", "2 \\sqrt{3}", True), ("6", "5", False), ("0.333", "1/3", False), ("", "5", False),
    ("5 pi", "5", False), ("x + y", "x+y", True), ("1/0", "2", False), ("12,34", "1234", False),
    ("\u0664\u0662", "42", False),
])
def test_math_normalisation(pred, ref, same):
    assert answers_match(pred, ref) is same, (normalize(pred), normalize(ref))


def test_last_boxed():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{5} and \\boxed{6") == "5"          # unbalanced last one is skipped
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("\\boxed {8}") == "8"
    assert last_boxed("no box") is None
    t0 = time.perf_counter()
    assert last_boxed("\\boxed{" * 100_000) is None
    assert time.perf_counter() - t0 < 1.0


def test_math_task(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"}
            for i in range(600, 610)]
    rows.append({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac12}$."})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = make_task("math", {"data": str(p), "train_size": 4})
    train, held = t.examples("train"), t.examples("heldout")
    assert (len(train), len(held)) == (4, 7) and t.chat_template is True
    assert train[0].fields == {"answer": "1,200"} and "\\boxed{}" in train[0].prompt
    assert held[-1].fields == {"answer": "\\frac12"}
    cases = {"so \\boxed{1200}": 1.0, "\\boxed{1,200}": 1.0, "\\boxed{\\$1200.00}": 1.0,
             "\\boxed{1200} no wait \\boxed{1201}": 0.0, "1200": 0.0, "\\boxed{1200": 0.0}
    for text, want in cases.items():
        s = t.score(train[0], text)
        assert (s.reward, s.correct) == (want, want == 1.0), text
    assert t.score(held[-1], "\\boxed{0.5}").correct
    rec = t.from_record({"answer": "blah #### 72", "response": ""})
    assert t.score(rec, "\\boxed{72}").reward == 1.0
    assert len(make_task("math", {"data": str(p), "train_size": 4, "heldout_size": 2}).examples("heldout")) == 2


def test_math_task_default_sample():
    t = make_task("math", {})               # no data: the packaged sample, 16 train + 48 held out
    train, held = t.examples("train"), t.examples("heldout")
    assert (len(train), len(held)) == (16, 48)
    assert {e.id for e in train}.isdisjoint(e.id for e in held)
    assert all(e.fields["answer"].isdigit() and "\\boxed{}" in e.prompt for e in train + held)
    assert t.score(train[0], f"so \\boxed{{{train[0].fields['answer']}}}").correct
    assert len(make_task("math", {"train_size": 4, "heldout_size": 5}).examples("heldout")) == 5


def test_math_task_errors(tmp_path):
    with pytest.raises(TaskDataError, match="task.options: unknown key 'foo' for task math"):
        make_task("math", {"data": "x", "foo": 1})
    p = tmp_path / "m.jsonl"
    p.write_text('{"question": "q", "answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(TaskDataError, match=r"m.jsonl:2: missing field 'answer'"):
        make_task("math", {"data": str(p)}).examples("train")
    p.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(TaskDataError, match="train_size"):
        make_task("math", {"data": str(p)}).examples("train")


# ------------------------------------------------------------------ sudoku
def _grid(s):
    return [0 if c == "." else int(c) for c in s]


@pytest.mark.parametrize("size, options", [(4, {}), (9, {"train_size": 4, "heldout_size": 4})])
def test_sudoku_generator_unique_and_deterministic(size, options):
    opts = {"size": size, **options}
    t = make_task("sudoku", opts)
    train, held = t.examples("train"), t.examples("heldout")
    assert _ids_prompts(train) == _ids_prompts(make_task("sudoku", opts).examples("train"))
    assert {e.fields["puzzle"] for e in train}.isdisjoint({e.fields["puzzle"] for e in held})
    for e in train + held:
        puzzle, sol = e.fields["puzzle"], e.fields["solution"]
        assert len(puzzle) == size * size and puzzle.count(".") > 0
        assert count_solutions(_grid(puzzle), size) == 1
        assert count_solutions(_grid(sol), size) == 1
        assert all(p in (".", s) for p, s in zip(puzzle, sol))
        assert t.score(e, sol).reward == 1.0


def test_sudoku_count_solutions():
    assert count_solutions([0] * 16, 4, limit=1000) == 288
    assert count_solutions([1, 1] + [0] * 14, 4) == 0


def test_sudoku_scoring():
    t = make_task("sudoku", {})
    ex = t.examples("train")[0]
    puzzle, sol = ex.fields["puzzle"], ex.fields["solution"]
    rows = "\n".join(sol[i:i + 4] for i in range(0, 16, 4))
    blanks = [i for i, c in enumerate(puzzle) if c == "."]
    assert t.score(ex, f"Thinking 1 2 3...\n{rows}").reward == 1.0
    wrong = list(sol)
    i = blanks[0]
    wrong[i] = "1" if sol[i] != "1" else "2"
    s = t.score(ex, "".join(wrong))
    assert s.reward == pytest.approx(0.5 * (len(blanks) - 1) / len(blanks)) and not s.correct
    given = next(i for i, c in enumerate(puzzle) if c != ".")
    changed = list(sol)
    changed[given] = "1" if sol[given] != "1" else "2"
    assert t.score(ex, "".join(changed)).reward == 0.0
    assert t.score(ex, sol[:-1]).reward == 0.0                     # too few digits
    assert t.score(ex, "").reward == 0.0
    assert t.score(ex, puzzle.replace(".", "0")).reward == 0.0       # blanks left as 0
    with pytest.raises(TaskDataError, match="size"):
        make_task("sudoku", {"size": 5})
    with pytest.raises(TaskDataError, match="task.options: unknown key 'foo' for task sudoku"):
        make_task("sudoku", {"foo": 1})
    with pytest.raises(TaskDataError, match="puzzle"):
        t.from_record({"puzzle": "123", "solution": "123"}, where="r:1")


def test_conciseness_reward_and_missing_penalty():
    from es_mpi.tasks.conciseness import ConcisenessTask

    ex = Example("q", "What is the capital of France?", {"answer": "Paris"})
    paper = ConcisenessTask()
    assert paper.score(ex, " Paris. ").reward == -1.0 and paper.score(ex, " Paris. ").correct
    assert paper.score(ex, "Rome").reward == -1.0 and not paper.score(ex, "Rome").correct
    keep = ConcisenessTask({"missing_penalty": 40})
    assert keep.score(ex, "Paris.").reward == -1.0               # right answers are scored as before
    assert keep.score(ex, "Rome").reward == -41.0                # a wrong one pays the penalty
    assert keep.score(ex, "Rome").components == {"length": 4.0, "contains": 0.0}
    for bad in (-1, "x", float("nan"), True):
        with pytest.raises(TaskDataError, match="task.options.missing_penalty: expected a number >= 0"):
            ConcisenessTask({"missing_penalty": bad})
