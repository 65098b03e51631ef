"""Sudoku (4x4 or 9x9), generated with a unique solution.

Puzzles: a seeded random solution grid (a valid base pattern with rows, columns,
bands, stacks and digits shuffled), then clues removed in random order, each
removal kept only if a solver counting solutions up to 2 still finds exactly one,
until `blanks` cells are empty or no clue can go.  A puzzle belongs to the train
or held-out split by a hash of its text, so the splits are disjoint for any sizes.

Records: `puzzle` is the grid row by row as one string, '.' for a blank (e.g.
"1.3.....2..14..."), `solution` the full grid as digits.

Completion rule: the grid is the LAST size*size ASCII digits of the completion, in
row-major order (so the model may think first and must end with the grid; 0 and
other out-of-range digits count as wrong cells; fewer digits = unparseable).

Reward (components cell_reward, solved):
  0.0                          unparseable, or a given clue changed
  0.5 * (blanks filled right) / (number of blanks)
  + 0.5 if the grid is a complete valid solution (rows, columns, boxes)
so a full solution scores 1.0; correct = solved.

Options: common ones (no data), size: 4 | 9 (default 4), blanks: how many cells
to empty (default 10 for 4x4, 50 for 9x9; fewer if uniqueness stops earlier).
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Mapping

from ._common import task_options
from .base import Example, Score, Task, TaskDataError

BOX = {4: 2, 9: 3}
DEFAULT_BLANKS = {4: 10, 9: 50}


def _units(n: int) -> list[list[int]]:
    b = BOX[n]
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(br + r) * n + bc + c for r in range(b) for c in range(b)]
             for br in range(0, n, b) for bc in range(0, n, b)]
    return rows + cols + boxes


_POPCOUNT = [bin(m).count("1") for m in range(1 << 9)]


def count_solutions(grid: list[int], n: int, limit: int = 2) -> int:
    """Solutions of `grid` (row-major, 0 = blank), counted up to `limit`.
    Row/column/box bitmasks, most-constrained cell first; recursion depth is at most
    the number of blanks (<= 81)."""
    b, full = BOX[n], (1 << n) - 1
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    blanks = []
    for i, v in enumerate(grid):
        r, c = divmod(i, n)
        k = (r // b) * b + c // b
        if v:
            bit = 1 << (v - 1)
            if (rows[r] | cols[c] | boxes[k]) & bit:
                return 0                       # the givens already clash
            rows[r] |= bit
            cols[c] |= bit
            boxes[k] |= bit
        else:
            blanks.append((r, c, k))
    found = 0

    def solve(todo: list) -> bool:             # True: stop, `limit` reached
        nonlocal found
        if not todo:
            found += 1
            return found >= limit
        best, best_mask, best_count = 0, 0, n + 1
        for idx, (r, c, k) in enumerate(todo):
            m = full & ~(rows[r] | cols[c] | boxes[k])
            if _POPCOUNT[m] < best_count:
                best, best_mask, best_count = idx, m, _POPCOUNT[m]
                if best_count <= 1:
                    break
        r, c, k = todo[best]
        rest = todo[:best] + todo[best + 1:]
        while best_mask:
            bit = best_mask & -best_mask
            best_mask ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[k] |= bit
            if solve(rest):
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[k] ^= bit
        return False

    solve(blanks)
    return found


def random_solution(n: int, rng: random.Random) -> list[int]:
    b = BOX[n]
    def shuffled_lines():
        bands = rng.sample(range(b), b)
        return [band * b + k for band in bands for k in rng.sample(range(b), b)]
    rows, cols, digits = shuffled_lines(), shuffled_lines(), rng.sample(range(1, n + 1), n)
    pattern = lambda r, c: (b * (r % b) + r // b + c) % n    # a valid sudoku grid
    return [digits[pattern(r, c)] for r in rows for c in cols]


def make_puzzle(n: int, rng: random.Random, blanks: int) -> tuple[str, str]:
    solution = random_solution(n, rng)
    grid = list(solution)
    removed = 0
    for i in rng.sample(range(n * n), n * n):
        if removed >= blanks:
            break
        keep, grid[i] = grid[i], 0
        if count_solutions(grid, n) == 1:
            removed += 1
        else:
            grid[i] = keep
    return "".join(str(v) if v else "." for v in grid), "".join(map(str, solution))


def grid_text(puzzle: str, n: int) -> str:
    return "\n".join(puzzle[r * n:(r + 1) * n] for r in range(n))


def is_valid_solution(cells: list[int], n: int) -> bool:
    want = set(range(1, n + 1))
    return all({cells[i] for i in u} == want for u in _units(n))


def _check_fields(puzzle: Any, solution: Any, where: str) -> int:
    """Grid size of a (puzzle, solution) pair, or TaskDataError naming the field."""
    for key, val in (("puzzle", puzzle), ("solution", solution)):
        if not isinstance(val, str) or len(val) not in (16, 81):
            raise TaskDataError(f"{where}: field {key!r} must be a 16- or 81-character string")
    n = 4 if len(puzzle) == 16 else 9
    if len(solution) != len(puzzle) or not all("1" <= c <= str(n) for c in solution) \
            or not all(c == "." or c == s for c, s in zip(puzzle, solution)):
        raise TaskDataError(f"{where}: fields 'puzzle' and 'solution' do not agree")
    return n


class SudokuTask(Task):
    name = "sudoku"
    chat_template = True
    record_fields = ("puzzle", "solution")

    def __init__(self, options: Mapping[str, Any] | None = None):
        super().__init__(options)
        opts = task_options(self, {"size": "int", "blanks": "count"})
        if "data" in opts:
            raise TaskDataError("task.options.data: the sudoku task generates its puzzles "
                                "and takes no data file")
        self.size = opts.get("size", 4)
        if self.size not in BOX:
            raise TaskDataError(f"task.options.size: expected 4 or 9, got {self.size}")
        self.blanks = min(opts.get("blanks", DEFAULT_BLANKS[self.size]), self.size ** 2)
        self.seed = opts.get("seed", 0)
        self.sizes = {"train": opts.get("train_size", 200), "heldout": opts.get("heldout_size", 200)}
        self._rng = random.Random(f"sudoku:{self.size}:{self.blanks}:{self.seed}")
        self._seen: set[str] = set()
        self._pools: dict[str, list[Example]] = {"train": [], "heldout": []}

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "heldout"):
            raise TaskDataError(f"split: expected 'train' or 'heldout', got {split!r}")
        # One seeded stream of distinct puzzles; a hash bit of each puzzle picks its
        # split, so each split is a prefix of a fixed sequence whatever the other's size.
        want = self.sizes[split]
        tries = 0
        while len(self._pools[split]) < want:
            tries += 1
            if tries > 50 * want + 1000:       # 4x4 has few distinct puzzles at high blank counts
                raise TaskDataError(f"task.options.{split}_size: cannot generate {want} distinct "
                                    f"{self.size}x{self.size} puzzles with blanks={self.blanks}")
            puzzle, solution = make_puzzle(self.size, self._rng, self.blanks)
            if puzzle in self._seen:
                continue
            self._seen.add(puzzle)
            which = ("train", "heldout")[hashlib.sha256(puzzle.encode()).digest()[0] & 1]
            pool = self._pools[which]
            pool.append(self._example(f"sudoku{self.size}-{which}-{len(pool)}", puzzle, solution))
        return self._pools[split][:want]

    def _example(self, eid: str, puzzle: str, solution: str) -> Example:
        n = 4 if len(puzzle) == 16 else 9
        b = BOX[n]
        prompt = (f"Solve this {n}x{n} Sudoku. Fill every '.' so that each row, each column and "
                  f"each {b}x{b} box contains the digits 1-{n} exactly once.\n\n{grid_text(puzzle, n)}\n\n"
                  f"End your reply with the completed grid: {n} lines of {n} digits.")
        return Example(id=eid, prompt=prompt, fields={"puzzle": puzzle, "solution": solution})

    def from_record(self, record: Mapping[str, Any], where: str = "record") -> Example:
        ex = super().from_record(record, where)
        _check_fields(ex.fields["puzzle"], ex.fields["solution"], where)
        return ex

    def score(self, example: Example, completion: str) -> Score:
        puzzle, solution = example.fields["puzzle"], example.fields["solution"]
        n = _check_fields(puzzle, solution, f"example {example.id}")
        digits = re.sub(r"[^0-9]", "", completion)      # ASCII digits only, in order
        zero = Score(reward=0.0, components={"cell_reward": 0.0, "solved": 0.0}, correct=False)
        if len(digits) < n * n:
            return zero
        cells = [int(c) for c in digits[-n * n:]]
        if any(p != "." and int(p) != v for p, v in zip(puzzle, cells)):
            return zero
        blanks = [i for i, p in enumerate(puzzle) if p == "."]
        right = sum(cells[i] == int(solution[i]) for i in blanks)
        cell = right / len(blanks) if blanks else 1.0
        solved = is_valid_solution(cells, n)
        reward = 0.5 * cell + (0.5 if solved else 0.0)
        return Score(reward=reward, components={"cell_reward": cell, "solved": float(solved)},
                     correct=solved)
