"""Rationales built from a reasoning-gym entry's metadata, for the SFT demonstrations.

A demonstration's reasoning always comes from the data. For reasoning-gym tasks whose
entries hold the expression they ask about (``basic_arithmetic``, ``chain_sum``), the
reasoning is the exact step-by-step evaluation of that expression
(:func:`evaluation_steps`): "3 + 4 * 2 = 3 + 8 = 11". :data:`RATIONALE_BUILDERS` maps
each such task to its builder; :mod:`jaxpost.data.demonstrations` keeps a rationale only
when the task's verifier accepts its answer and it equals the reference answer.
"""

from __future__ import annotations

import fractions
import re
from collections.abc import Callable
from typing import Any

__all__ = ["RATIONALE_BUILDERS", "evaluation_steps"]

_NEG_OPEN = "-("  # a unary minus applied to a parenthesised group
_OPERATORS = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
    "/": lambda x, y: x / y,
}
_ARITHMETIC_TOKEN_RE = re.compile(r"\d+|[-+*/()]|\S")


def _tokens(expression: str) -> list[Any]:
    """Numbers (Fraction), binary operators, "(", "-(" and ")"; checked well formed."""
    tokens: list[Any] = []
    raw = _ARITHMETIC_TOKEN_RE.findall(expression)
    expect_operand, depth, negate, i = True, 0, False, 0
    while i < len(raw):
        tok = raw[i]
        if expect_operand:
            if tok == "-" and not negate:
                negate = True  # unary: "-3", "2 - -1", "-(4 + 1)"
            elif tok.isdigit():
                tokens.append(fractions.Fraction(-int(tok) if negate else int(tok)))
                expect_operand, negate = False, False
            elif tok == "(":
                tokens.append(_NEG_OPEN if negate else "(")
                depth, negate = depth + 1, False
            else:
                raise ValueError(f"expression {expression!r}: expected a number or '(' at {tok!r}")
        elif tok in _OPERATORS:
            tokens.append(tok)
            expect_operand = True
        elif tok == ")" and depth > 0:
            tokens.append(tok)
            depth -= 1
        else:
            raise ValueError(f"expression {expression!r}: expected an operator or ')' at {tok!r}")
        i += 1
    if expect_operand or depth:
        raise ValueError(f"expression {expression!r} is incomplete")
    return tokens


def _render_value(value: fractions.Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"({value.numerator}/{value.denominator})"


def _render(tokens: list[Any]) -> str:
    out = ""
    for tok in tokens:
        text = _render_value(tok) if isinstance(tok, fractions.Fraction) else tok
        tight = not out or out.endswith("(") or tok == ")"
        out += text if tight else f" {text}"
    return out


def _reduce_flat(tokens: list[Any]) -> list[Any]:
    """One operation of a parenthesis-free [number, op, number, ...]: the first * or /,
    else the first + or -."""
    ops = range(1, len(tokens), 2)
    at = next((i for i in ops if tokens[i] in "*/"), 1)
    left, op, right = tokens[at - 1 : at + 2]
    if op == "/" and right == 0:
        raise ValueError("division by zero")
    return [*tokens[: at - 1], _OPERATORS[op](left, right), *tokens[at + 2 :]]


def _step(tokens: list[Any]) -> list[Any]:
    """One operation, innermost parentheses first; a group reduced to one number loses
    its parentheses (and takes its unary minus) in the same step."""
    close = next((i for i, tok in enumerate(tokens) if tok == ")"), None)
    if close is None:
        return _reduce_flat(tokens)
    start = max(i for i in range(close) if tokens[i] in ("(", _NEG_OPEN))
    inner = tokens[start + 1 : close]
    if len(inner) > 1:
        inner = _reduce_flat(inner)
    if len(inner) > 1:
        return [*tokens[: start + 1], *inner, *tokens[close:]]
    value = -inner[0] if tokens[start] == _NEG_OPEN else inner[0]
    return [*tokens[:start], value, *tokens[close + 1 :]]


def evaluation_steps(expression: str) -> tuple[tuple[str, ...], fractions.Fraction]:
    """Evaluates an arithmetic expression exactly, one operation at a time.

    Order: the innermost parentheses first (leftmost first), inside them and then
    outside, ``*`` and ``/`` left to right before ``+`` and ``-`` left to right.
    Numbers are non-negative integers, optionally with a unary minus ("-3", "2 - -1",
    "-(4 + 1)"); whitespace is free. Arithmetic is exact (``fractions.Fraction``);
    an integer renders without ".0" and a non-integer as "(7/2)".

    Returns:
      (stages, value): the expression as rendered, then the expression after each
      operation, the last stage being the value; ``" = ".join(stages)`` reads
      "3 + 4 * 2 = 3 + 8 = 11".

    Raises:
      ValueError: a token other than numbers, ``+ - * /`` and parentheses, a malformed
        expression, or a division by zero.

    >>> " = ".join(evaluation_steps("3 + 4 * 2 - (5 - 1)")[0])
    '3 + 4 * 2 - (5 - 1) = 3 + 4 * 2 - 4 = 3 + 8 - 4 = 11 - 4 = 7'
    """
    tokens = _tokens(expression)
    stages = [_render(tokens)]
    while len(tokens) > 1:
        tokens = _step(tokens)
        stages.append(_render(tokens))
    return tuple(stages), tokens[0]


def _expression_rationale(entry: dict) -> tuple[str, str]:
    """The step-by-step evaluation of ``metadata["expression"]`` and its value."""
    expression = entry.get("metadata", {}).get("expression")
    if not isinstance(expression, str):
        raise ValueError("the entry's metadata has no 'expression'")
    stages, value = evaluation_steps(expression)
    return " = ".join(stages), _render_value(value)


# Task name -> builder(entry) -> (reasoning, answer). A builder raises ValueError when it
# cannot read an entry; its answer must still pass the task's verifier and equal the
# reference answer, or the demonstration is dropped.
RATIONALE_BUILDERS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "basic_arithmetic": _expression_rationale,
    "chain_sum": _expression_rationale,
}
