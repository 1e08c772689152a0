"""Reading a completion: its answer, the number in it, and whether it echoes the prompt.

The reward functions (:mod:`jaxpost.rewards.builtin`), the evaluation and the demonstrations all
read completions through these, so an answer counts the same way everywhere.
"""

from __future__ import annotations

import functools
import math
import re

# Relative tolerance under which two numbers count as equal (float round-off, "1000.0").
_NUMERIC_RTOL = 1e-6


_NUMBER_RE = re.compile(
    r"""
    (?P<sign>[-+])?\s*\$?\s*(?P<sign2>[-+])?          # "-3", "-$3", "$-3"
    (?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)  # "1,000.5", "1000", ".5"
    (?P<exp>[eE][-+]?\d+)?                           # "1e5"
    (?:/(?P<den>\d+(?:\.\d+)?))?                     # "3/4"
    """,
    re.VERBOSE,
)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# "-" and "." are not stripped from the front: "-3" and ".5" are not "3" and "5".
_LEADING_PUNCT = " \t\r\n,;:!?\"'`*([{"
_TRAILING_PUNCT = " \t\r\n.,;:!?\"'`*)]}"

# A completion that shares this many consecutive words with the instruction copies it.
# Eight words is longer than any phrase an answer shares with "write your reasoning
# between <reasoning> and </reasoning>" by chance, and shorter than its sentences.
ECHO_MIN_WORDS = 8
# Words for the echo check: a tag or chat marker ("<reasoning>", "<|im_end|>") is a word
# even when glued to text; otherwise runs of non-space characters.
_WORD_RE = re.compile(r"</?[A-Za-z0-9_|-]+>|[^\s<]+|<")
_WORD_PUNCT = ".,;:!?\"'`*()[]{}"


# ---------------------------------------------------------------------------
# Helpers


def extract_answer(completion: str, answer_tag: str = "answer") -> str | None:
    """Return the text inside the last complete ``<answer>...</answer>``, stripped.

    "Last complete" means the last closing tag and the nearest opening tag before it,
    so a trailing unterminated ``<answer>`` does not hide an earlier finished one.

    Args:
      completion: model output.
      answer_tag: tag name, without angle brackets.

    Returns:
      The stripped inner text (possibly ``""``), or ``None`` when there is no
      complete answer tag.

    >>> extract_answer("<answer>3</answer> then <answer> 4 </answer>")
    '4'
    >>> extract_answer("<answer>4") is None
    True
    """
    opening, closing = f"<{answer_tag}>", f"</{answer_tag}>"
    end = completion.rfind(closing)
    if end == -1:
        return None
    start = completion.rfind(opening, 0, end)
    if start == -1:
        return None
    return completion[start + len(opening) : end].strip()


def parse_number(text: str) -> float | None:
    """Return the first number-like token of ``text`` as a float, or ``None``.

    Understands thousands separators ("1,000"), currency ("$1000", "-$5"), decimals
    ("1000.0", ".5"), signs ("-3"), exponents ("1e5"), fractions without spaces
    ("3/4" -> 0.75), percentages ("50%" -> 50.0; the "%" is dropped) and surrounding
    words or a trailing period ("The answer is 42." -> 42.0). A fraction with a zero
    denominator, or a value that does not fit a finite float, gives ``None``.

    >>> parse_number("$1,000.")
    1000.0
    >>> parse_number("3/4")
    0.75
    >>> parse_number("no digits") is None
    True
    """
    text = text.replace("\u2212", "-")  # Unicode minus sign.
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    value = float(match.group("num").replace(",", "") + (match.group("exp") or ""))
    den = match.group("den")
    if den is not None:
        try:
            value /= float(den)
        except ZeroDivisionError:
            return None
    if "-" in (match.group("sign"), match.group("sign2")):
        value = -value
    return value if math.isfinite(value) else None


def normalize_answer(text: str) -> str:
    """Normalise an answer string for exact comparison.

    Lowercases, removes ``$`` and thousands separators ("1,000" -> "1000"), collapses
    runs of whitespace to one space, and strips whitespace and punctuation at the ends
    (quotes, ``*``, brackets, ``,;:!?`` on both sides; ``.`` at the end only, so a
    leading ``-`` or ``.`` survives).

    >>> normalize_answer("  **$1,000**. ")
    '1000'
    >>> normalize_answer("Paris.")
    'paris'
    """
    text = text.lower().replace("$", "")
    text = _THOUSANDS_RE.sub("", text)
    text = " ".join(text.split())
    return text.lstrip(_LEADING_PUNCT).rstrip(_TRAILING_PUNCT)


def numbers_equal(x: float, y: float) -> bool:
    return abs(x - y) < _NUMERIC_RTOL * max(1.0, abs(x), abs(y))


def _echo_words(text: str) -> list[str]:
    """Lowercased words of ``text``, with punctuation at their ends stripped (not tags')."""
    words = []
    for token in _WORD_RE.findall(text.lower()):
        word = token if token.startswith("<") and token.endswith(">") else token.strip(_WORD_PUNCT)
        if word:
            words.append(word)
    return words


@functools.lru_cache(maxsize=256)
def _instruction_ngrams(prompt: str, question: str) -> frozenset[tuple[str, ...]]:
    """Every run of ECHO_MIN_WORDS words of ``prompt`` that lies outside ``question``.

    Cached: Tunix scores G completions of each prompt, so one prompt comes G times.
    """
    words, cut = _echo_words(prompt), _echo_words(question)
    segments, start, i = [], 0, 0
    while cut and i + len(cut) <= len(words):
        if words[i] == cut[0] and words[i : i + len(cut)] == cut:
            segments.append(words[start:i])
            i = start = i + len(cut)
        else:
            i += 1
    segments.append(words[start:])
    n = ECHO_MIN_WORDS
    return frozenset(tuple(seg[j : j + n]) for seg in segments for j in range(len(seg) - n + 1))


def echoes_prompt(prompt: str, completion: str, question: str | None = None) -> bool:
    """Whether ``completion`` copies the instruction instead of answering it.

    True when the completion
      - holds a run of at least :data:`ECHO_MIN_WORDS` consecutive words that also
        stands in ``prompt`` outside ``question`` (the system prompt, the chat-template
        markup, rubric lines: everything but the question itself), or
      - holds the whole ``question`` when the question has at least ECHO_MIN_WORDS words.
    Words are whitespace-separated, compared lowercased, with punctuation at their
    ends stripped; a tag such as ``<reasoning>`` is a word of its own even when glued
    to text. A short question restated in the reasoning ("Calculate 4 - 1.") is not
    an echo, nor is a copy of part of a question.

    Args:
      prompt: the full formatted prompt the completion answers.
      completion: the model's output.
      question: the question as it stands in the prompt; None treats the whole prompt
        as instruction.

    >>> echoes_prompt("Answer between <answer> and </answer>, and think step by step. 2 + 2?",
    ...               "answer between <answer> and </answer>, and think step by step", "2 + 2?")
    True
    >>> echoes_prompt("Answer between <answer> and </answer>. 2 + 2?",
    ...               "<answer>4</answer>", "2 + 2?")
    False
    """
    words = _echo_words(completion)
    if question is not None:
        cut = _echo_words(question)
        # Words hold no spaces, so a run of words is a substring between spaces.
        if len(cut) >= ECHO_MIN_WORDS and f" {' '.join(cut)} " in f" {' '.join(words)} ":
            return True
    grams = _instruction_ngrams(prompt, question or "")
    n = ECHO_MIN_WORDS
    return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))
