"""Rule-based grading of math answers: the ``math_dapo`` reward (docs/algorithms.md section 9).

The response should end with a line ``Answer: <answer>``. Only the last ``TAIL_CHARS`` (300) characters
are read; the last ``Answer:`` match there is the prediction. Prediction and ground truth go through
the same ``normalize_answer`` and are compared as strings: +1.0 if equal, -1.0 otherwise (also when
no ``Answer:`` line is found). This follows the grader the paper trained and evaluated with.

Where this module differs from the official grader (all but the comma rule accept more spellings
of the same answer; on the integer answers of AIME/AMC the two agree apart from these spellings):

- a trailing period, Markdown bold (``**``) and ``\\(...\\)`` / ``\\[...\\]`` delimiters are dropped;
- ``\\dfrac`` / ``\\tfrac`` read as ``\\frac``; ``%``, ``°`` and the Unicode minus are handled;
- wrappers (``\\boxed``, ``\\text``, ...) are removed with balanced braces, before splitting on ``=``;
- numbers are compared in canonical form (``12.0`` == ``12``, ``1,000`` == ``1000``, ``-1,000`` too),
  but commas are only read as thousands separators in groups of three (``1,2`` stays a pair; the
  official rule reads it as 12);
- unit words are removed as whole words only (the official rule deletes them inside other words too).

``compute_score_math_verify`` adds a symbolic check with the ``math-verify`` package, under a timeout.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

TAIL_CHARS = 300
ANSWER_PATTERN = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)
CORRECT_SCORE = 1.0
INCORRECT_SCORE = -1.0

# Literal pieces removed or rewritten before anything else (order matters: longest first).
_LITERAL_REWRITES: tuple[tuple[str, str], ...] = (
    ("\\$", ""),  # an escaped dollar is currency, not math mode
    ("\\text{m}", ""),  # metres
    ("\\text{ m}", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\degree", ""),
    ("°", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\left", ""),
    ("\\right", ""),
    ("\\ldots", ""),
    ("\\dots", ""),
    ("{,}", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", ""),
    ("\\(", ""),
    ("\\)", ""),
    ("\\[", ""),
    ("\\]", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\mbox", "\\text"),
    ("\u2212", "-"),  # Unicode minus sign
    ('"', ""),
)
_AND_RE = re.compile(r",?\s*\\text\{\s*and\s*\}\s*")
_WRAPPERS = ("\\boxed", "\\fbox", "\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\overline")
_UNIT_WORDS = (
    "units?", "square", "cubic", "ways", "integers?", "dollars?", "cents?", "mph", "km", "cm", "gm",
    "inch(?:es)?", "feet", "foot", "hours?", "minutes?", "seconds?", "degrees?", "points?", "digits?",
    "pounds?", "meters?", "meals?", "edges?", "students?", "multiples?", "tickets?", "children",
)
# A unit word counts only when no letter touches it; a following ^2 / ^3 goes with it.
_UNIT_RE = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(_UNIT_WORDS) + r")(?![A-Za-z])(?:\^\{?[23]\}?)?")
_ARTICLE_RE = re.compile(r"(?<![A-Za-z\\])an?\s+(?=[A-Za-z0-9\\])")  # "a 5", not "a + b"
_FRAC_SHORT_RE = re.compile(r"\\frac([^{\\])([^{\\])")  # \frac12 -> \frac{1}{2}
_SQRT_SHORT_RE = re.compile(r"\\sqrt([^{\\])")  # \sqrt2 -> \sqrt{2}
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d*)(?:\.\d+)?")


def _unwrap(text: str, command: str) -> str:
    """Replace every ``command{X}`` by ``X``, matching braces (an unclosed one keeps the rest)."""
    opener = command + "{"
    while (start := text.find(opener)) != -1:
        depth, i = 1, start + len(opener)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        inner_end = i - 1 if depth == 0 else i
        text = text[:start] + text[start + len(opener) : inner_end] + text[i:]
    return text


def _canonical_number(text: str) -> str:
    """``'1,000'`` -> ``'1000'``, ``'12.50'`` -> ``'12.5'``, ``'-0'`` -> ``'0'``; other text unchanged."""
    if not text or not _NUMBER_RE.fullmatch(text) or not any(ch.isdigit() for ch in text):
        return text
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer; applied identically to prediction and ground truth."""
    text = _AND_RE.sub(",", answer)
    for old, new in _LITERAL_REWRITES:
        text = text.replace(old, new)
    for command in _WRAPPERS:
        text = _unwrap(text, command)
    text = text.split("=")[-1]
    if text.count("$") >= 2:  # keep what the first $...$ pair encloses
        first = text.index("$")
        text = text[first + 1 : text.index("$", first + 1)]
    text = text.replace("$", "")
    text = _UNIT_RE.sub("", text)
    text = _ARTICLE_RE.sub("", text)
    text = "".join(text.split())
    text = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", text)
    text = text.lstrip("*").rstrip(".*")
    return _canonical_number(text)


def extract_answer(response: str, tail_chars: int = TAIL_CHARS) -> str | None:
    """Raw text of the last ``Answer: ...`` line within the last ``tail_chars`` characters, or None."""
    matches = ANSWER_PATTERN.findall(response[-tail_chars:] if tail_chars > 0 else response)
    return matches[-1] if matches else None


def compute_score(response: str, ground_truth: str) -> dict:
    """Grade one response: ``{"score": +1.0 | -1.0, "acc": bool, "pred": normalised answer | None}``."""
    raw = extract_answer(response)
    if raw is None:
        return {"score": INCORRECT_SCORE, "acc": False, "pred": None}
    pred = normalize_answer(raw)
    correct = bool(pred) and pred == normalize_answer(str(ground_truth))
    return {"score": CORRECT_SCORE if correct else INCORRECT_SCORE, "acc": correct, "pred": pred}


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft length penalty: 0 up to ``max_len - buffer`` tokens, then linear to -1 at ``max_len``.

    penalty = clip(-(length - (max_len - buffer)) / buffer, -1, 0). Added to the score by the caller.
    """
    if max_len <= 0 or not 0 < buffer <= max_len:
        raise ValueError(f"overlong_penalty needs max_len > 0 and 0 < buffer <= max_len; got {max_len=}, {buffer=}")
    if length < 0:
        raise ValueError(f"overlong_penalty: length must be >= 0, got {length}")
    excess = length - (max_len - buffer)
    return max(-1.0, min(0.0, -excess / buffer))


def _math_verify_equal(prediction: str, ground_truth: str) -> bool:
    from math_verify import parse, verify  # imported lazily: sympy start-up is slow

    # Timeouts are disabled inside math-verify (they rely on signal.alarm); the caller bounds the time.
    gold = parse(f"${ground_truth}$", parsing_timeout=None)
    pred = parse(f"${prediction}$", parsing_timeout=None)
    return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)


def compute_score_math_verify(response: str, ground_truth: str, timeout_s: float = 5.0) -> dict:
    """Like ``compute_score``, but a non-matching answer also gets a symbolic check by math-verify.

    Still requires the ``Answer:`` line. The symbolic check runs under ``timeout_s`` seconds (signal
    timer on the main thread; elsewhere a worker thread that is abandoned on timeout, so prefer the
    main thread). A timeout or a math-verify error counts as incorrect and adds an ``error`` key.
    """
    from rpg.rewards import call_with_timeout  # the package imports this module first

    result = compute_score(response, ground_truth)
    if result["acc"] or result["pred"] is None:
        return result
    gt = normalize_answer(str(ground_truth))
    try:
        correct = call_with_timeout(_math_verify_equal, timeout_s, result["pred"], gt)
    except Exception as exc:  # noqa: BLE001 - any failure of the optional checker means "not verified"
        return {**result, "error": f"math-verify failed: {type(exc).__name__}: {exc}"}
    if correct:
        return {"score": CORRECT_SCORE, "acc": True, "pred": result["pred"]}
    return result
