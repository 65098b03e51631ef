"""Safe arithmetic evaluation and the Countdown reward of the ES fine-tuning paper.

The paper's reward (countdown/countdown_task.py) scores the LAST <answer>...</answer>
block by running Python's `eval` on it.  We never call eval: a tokenizer and an
iterative shunting-yard parser rebuild exactly the Python expressions that the
reference's character filter lets through (digits, + - * / ( ) and spaces, so also
** and //), and the arithmetic itself is done by Python's own int/float operators,
which gives Python's semantics for free (int/int -> float, 2**-1 -> 0.5, floor
division, OverflowError on huge int -> float, complex results of (-8)**(1/3), ...).

Where the reference and this module differ, it is on inputs the reference cannot
finish or crashes on; they all score 0 here, at once:
  * an int result over MAX_INT_BITS bits (9**9**9**9 would never return);
  * an answer longer than MAX_EXPR_CHARS characters;
  * an integer literal over 4300 digits (CPython >= 3.11 raises ValueError
    in the reference's own int() call, outside its try).
Parentheses nested deeper than 200 are a SyntaxError in CPython (its tokenizer
limit) and score 0 in both.  Deep unary-operator chains, which CPython rejects at
version-dependent depths (RecursionError near 3000 in 3.11), are evaluated here.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Sequence

MAX_EXPR_CHARS = 10_000
MAX_PAREN_DEPTH = 200        # CPython tokenizer MAXLEVEL: deeper nesting is a SyntaxError
MAX_INT_BITS = 10_000        # a sane Countdown value is tiny; this bounds the work of every op
MAX_LITERAL_DIGITS = 4300    # CPython's default int_max_str_digits


class ExpressionError(ValueError):
    """The text is not an expression we evaluate, or its value is refused/undefined."""


# ---------------------------------------------------------------- evaluator
_BINARY = {"+": (1, operator.add), "-": (1, operator.sub), "*": (2, operator.mul),
           "/": (2, operator.truediv), "//": (2, operator.floordiv), "**": (4, operator.pow)}
_UNARY_PREC = 3              # Python: unary binds tighter than * but looser than ** on its left
_UNARY = {"u+": operator.pos, "u-": operator.neg}
_SPACE = " \t\f"


def _tokens(expr: str):
    """Yield ('num', int) or ('op', text).  Python's tokenizer rules for our alphabet:
    longest operator match (** and //), no leading zeros except all-zero literals
    ('00' is 0, '01' is a SyntaxError), newlines only inside parentheses or trailing."""
    i, n, depth = 0, len(expr), 0
    while i < n:
        c = expr[i]
        if c in _SPACE:
            i += 1
        elif c == "\n":
            # Inside parentheses a newline is blank space.  Outside, it ends the line:
            # we accept only trailing newlines (the Countdown filter lets through one
            # final newline, nothing else; Python's blank-line/indent rules are not needed)
            if depth == 0:
                if expr[i:].strip("\n"):
                    raise ExpressionError("text after a newline")
                return
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= expr[j] <= "9":
                j += 1
            lit = expr[i:j]
            if len(lit) > MAX_LITERAL_DIGITS:
                raise ExpressionError("integer literal too long")
            if lit[0] == "0" and lit.strip("0"):
                raise ExpressionError("leading zeros in a decimal integer literal")
            yield ("num", int(lit))
            i = j
        elif c in "*/" and expr[i + 1:i + 2] == c:
            yield ("op", c + c)
            i += 2
        elif c in "+-*/()":
            depth += (c == "(") - (c == ")")
            yield ("op", c)
            i += 1
        else:
            raise ExpressionError(f"character {c!r} is not allowed")


def _rpn(expr: str) -> list:
    """Parse to reverse Polish notation, checking the full syntax first (as Python
    compiles before it runs).  Iterative, so nesting costs no Python stack."""
    out: list = []
    stack: list[str] = []
    depth = 0
    want_operand = True
    prev = None
    for kind, tok in _tokens(expr):
        if want_operand:
            if kind == "num":
                out.append(tok)
                want_operand = False
            elif tok in ("+", "-"):
                stack.append("u" + tok)
            elif tok == "(":
                depth += 1
                if depth > MAX_PAREN_DEPTH:
                    raise ExpressionError("too many nested parentheses")
                stack.append("(")
            elif tok == ")" and prev == "(":
                # '()' is an empty tuple: legal Python, but no arithmetic on it gives a number
                raise ExpressionError("empty tuple")
            else:
                raise ExpressionError(f"unexpected {tok!r}")
        elif kind == "num" or tok == "(":
            # '2 3' is a SyntaxError; '2(3)' is a call, a TypeError at run time
            raise ExpressionError("operand where an operator is expected")
        elif tok == ")":
            while stack and stack[-1] != "(":
                out.append(stack.pop())
            if not stack:
                raise ExpressionError("unbalanced ')'")
            stack.pop()
            depth -= 1
        else:
            prec = _BINARY[tok][0]
            right = tok == "**"
            while stack and stack[-1] != "(":
                top = stack[-1]
                tprec = _UNARY_PREC if top in _UNARY else _BINARY[top][0]
                if tprec > prec or (tprec == prec and not right):
                    out.append(stack.pop())
                else:
                    break
            stack.append(tok)
            want_operand = True
        prev = tok
    if want_operand:
        raise ExpressionError("expression is empty or ends with an operator")
    while stack:
        top = stack.pop()
        if top == "(":
            raise ExpressionError("unbalanced '('")
        out.append(top)
    return out


def _check_int(v: Any) -> Any:
    if type(v) is int and v.bit_length() > MAX_INT_BITS:
        raise ExpressionError("integer result too large")
    return v


def _apply(op: str, a: Any, b: Any) -> Any:
    if op == "**" and type(a) is int and type(b) is int and b > 0 and abs(a) > 1:
        # refuse before computing: bits of a**b are about b*log2|a|
        if b > MAX_INT_BITS or b * math.log2(abs(a)) > MAX_INT_BITS:
            raise ExpressionError("power too large")
    # ints are bounded by MAX_INT_BITS, so every other op is cheap; floats/complex are O(1)
    return _check_int(_BINARY[op][1](a, b))


def evaluate(expr: str) -> int | float | complex:
    """Value of `expr` under Python semantics, or ExpressionError."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ExpressionError("expression too long")
    # eval() strips leading spaces and tabs
    program = _rpn(expr.lstrip(" \t"))
    vals: list = []
    try:
        for item in program:
            if type(item) is int:
                vals.append(item)
            elif item in _UNARY:
                vals.append(_UNARY[item](vals.pop()))
            else:
                b = vals.pop()
                vals.append(_apply(item, vals.pop(), b))
    except (ArithmeticError, TypeError, ValueError) as e:
        if isinstance(e, ExpressionError):
            raise
        raise ExpressionError(f"{type(e).__name__}: {e}") from None
    return vals[0]


# ---------------------------------------------------------------- countdown reward
# The reference uses the regexes in the comments below.  Their lazy '.*?' can take
# quadratic time on adversarial text, so the same languages are matched with
# str.find, in linear time (tests check the equivalence).
_ALLOWED = re.compile(r"[0-9+\-*/() ]+\n?")   # == re.match(r"^[0-9+\-*/() ]+$"): '$' also matches
                                               # before one final newline


def _full_format(text: str) -> bool:
    """re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", text, re.DOTALL)"""
    if not text.startswith("<think>"):
        return False
    if text.endswith("</answer>"):
        end = len(text) - 9
    elif text.endswith("</answer>\n"):
        end = len(text) - 10
    else:
        return False
    i = text.find("</think>\n<answer>", 7)
    return i != -1 and i + 17 <= end


def format_reward(response: str) -> float:
    """1.0 for '<think>'+response in the full format; else 0.1 for a think block and
    0.5 for an answer block (searched anywhere, so case and spacing of tags matter)."""
    text = "<think>" + response
    if _full_format(text):
        return 1.0
    reward = 0.0
    if text.find("</think>", 7) != -1:          # re.search(r"<think>.*?</think>")
        reward += 0.1
    a = text.find("<answer>")                    # re.search(r"<answer>.*?</answer>")
    if a != -1 and text.find("</answer>", a + 8) != -1:
        reward += 0.5
    return reward


def last_answer(response: str) -> str | None:
    """re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)[-1], or None."""
    pos, last = 0, None
    while True:
        a = response.find("<answer>", pos)
        if a == -1:
            return last
        b = response.find("</answer>", a + 8)
        if b == -1:
            return last
        last, pos = response[a + 8:b], b + 9


def answer_reward(response: str, numbers: Sequence[Any], target: Any) -> float:
    """1.0 when the last answer uses exactly `numbers` (as a multiset of the digit runs
    in it) and evaluates to within 1e-5 of float(target); else 0.0.  Never raises."""
    content = last_answer(response)
    if not content or len(content) > MAX_EXPR_CHARS or not _ALLOWED.fullmatch(content):
        return 0.0
    runs = re.findall(r"\d+", content)   # ASCII only here: the filter above rejects other digits
    if any(len(r) > MAX_LITERAL_DIGITS for r in runs):
        return 0.0
    try:
        if sorted(int(r) for r in runs) != sorted(numbers):
            return 0.0
        value = evaluate(content)
        return 1.0 if abs(float(value) - float(target)) < 1e-5 else 0.0
    except (ExpressionError, ArithmeticError, TypeError, ValueError):
        return 0.0


def countdown_reward(response: str, numbers: Sequence[Any], target: Any) -> dict:
    """The paper's reward_function: reward = 0.1 * format_reward + answer_reward."""
    fmt = format_reward(response)
    ans = answer_reward(response, numbers, target)
    return {"format_reward": fmt, "answer_reward": ans, "reward": fmt * 0.1 + ans}
