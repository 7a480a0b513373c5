"""The synthetic verifiable task for CPU runs: addition of two ``digits``-digit numbers.

Prompt ``"47+85=?\\n"``; target response ``"12,13\\nAnswer: 132"`` (then ``<eos>``): a short
scratchpad of column sums, least significant first, each including the carry from the previous
column (7+5=12; 4+8+1=13), then the final line that the ``math_dapo`` grader reads. The scratchpad
makes each token a one-step computation, which a 2-layer model learns in a few hundred SFT steps
(answering directly was still near 10% greedy accuracy after 800). With ``digits=2`` prompts are
8 characters and targets 14-17 plus ``<eos>``, so rollouts need at most 18 new tokens.
Careless variants (a forgotten carry, e.g. ``"12,12\\nAnswer: 122"`` or ``"12,13\\nAnswer: 32"``)
serve as the flawed demonstrations of the warm start (see ``rpg.models.warmstart``).

Splits are by *unordered* operand pair: if ``a+b`` is held out, so is ``b+a``, so a held-out
problem is never in training even up to commutativity. The split depends only on ``seed``, ``digits``
and ``n_test``; the held-out set is the same for every run that keeps those fixed.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Collection

DIGITS, N_TEST = 2, 500  # the toy data's split: operand digits and held-out problems

DATA_SOURCE = "toy"
ABILITY = "arithmetic"
SPLITS = ("train", "test")
ANSWER_PREFIX = "Answer: "
_ANSWER_RE = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)

Problem = tuple[str, str]  # (prompt_text, ground_truth)
#: New tokens a full 2-digit response needs (scratchpad, answer line, ``<eos>``).
MAX_RESPONSE_TOKENS = 18


def format_prompt(a: int, b: int) -> str:
    """The prompt text for ``a + b`` (exactly what the model sees; no chat markup)."""
    return f"{a}+{b}=?\n"


def column_sums(a: int, b: int, forget: Collection[int] = ()) -> list[int]:
    """Per-column sums of ``a + b`` from the units up, each including the incoming carry.

    A column index in ``forget`` drops its incoming carry (a careless demonstration).
    """
    sums, carry = [], 0
    while a or b or not sums:
        s = a % 10 + b % 10 + (0 if len(sums) in forget else carry)
        sums.append(s)
        carry, a, b = s // 10, a // 10, b // 10
    return sums


def format_response(a: int, b: int, forget: Collection[int] = ()) -> str:
    """The target response for ``a + b`` (without ``<eos>``); correct when ``forget`` is empty.

    ``forget`` holds the columns whose incoming carry is forgotten; index ``len(columns)`` means
    the last column's carry-out is left out of the answer (writing ``32`` for 132).
    """
    sums = column_sums(a, b, forget)
    top = sums[-1] % 10 if len(sums) in forget else sums[-1]
    answer = int(str(top) + "".join(str(x % 10) for x in reversed(sums[:-1])))
    return f"{','.join(str(x) for x in sums)}\n{ANSWER_PREFIX}{answer}"


def carry_points(a: int, b: int) -> list[int]:
    """Indices (as in ``forget``) of the carries the correct solution of ``a + b`` uses."""
    sums = column_sums(a, b)
    return [i + 1 for i, x in enumerate(sums) if x >= 10]


def careless_response(a: int, b: int, careless: float, rng: random.Random) -> str:
    """A demonstration that forgets each carry of ``a + b`` independently with prob. ``careless``."""
    return format_response(a, b, [i for i in carry_points(a, b) if rng.random() < careless])


def demonstrations(a: int, b: int) -> set[str]:
    """Every response a (possibly careless) demonstrator can write for ``a + b``."""
    points = carry_points(a, b)
    return {
        format_response(a, b, [p for k, p in enumerate(points) if mask >> k & 1])
        for mask in range(1 << len(points))
    }


def _operand_range(digits: int) -> range:
    if not 1 <= digits <= 3:
        raise ValueError(f"digits={digits} not supported: set digits to 1, 2 or 3")
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def split_pairs(seed: int = 0, digits: int = DIGITS, n_test: int = N_TEST) -> dict[str, list[tuple[int, int]]]:
    """Ordered operand pairs ``(a, b)`` of each split, in a seeded order.

    Unordered pairs are shuffled; the first ones (both orders) fill ``test`` up to ``n_test``
    problems; leftover orders of the last test pair are dropped, the rest go to ``train``.
    """
    ops = _operand_range(digits)
    unordered = [(a, b) for a in ops for b in ops if a <= b]
    if not 0 < n_test < len(unordered):
        raise ValueError(f"n_test={n_test} must be in (0, {len(unordered)}) for digits={digits}")
    rng = random.Random(f"toy-split-{seed}-{digits}")
    rng.shuffle(unordered)
    test: list[tuple[int, int]] = []
    k = 0
    while len(test) < n_test:
        a, b = unordered[k]
        test.extend([(a, b)] if a == b else [(a, b), (b, a)])
        k += 1
    test = test[:n_test]
    train = [p for a, b in unordered[k:] for p in ([(a, b)] if a == b else [(a, b), (b, a)])]
    rng.shuffle(train)
    rng.shuffle(test)
    return {"train": train, "test": test}


def _pairs(split: str, seed: int, digits: int, n_test: int) -> list[tuple[int, int]]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: set split to one of {SPLITS}")
    return split_pairs(seed, digits, n_test)[split]


def toy_problems(split: str, seed: int = 0, digits: int = DIGITS, n_test: int = N_TEST) -> list[Problem]:
    """``[(prompt_text, ground_truth), ...]`` for ``split`` in ``("train", "test")``."""
    return [(format_prompt(a, b), str(a + b)) for a, b in _pairs(split, seed, digits, n_test)]


def toy_sft_pairs(
    split: str, seed: int = 0, digits: int = DIGITS, n_test: int = N_TEST
) -> list[tuple[str, str]]:
    """``[(prompt_text, correct_response), ...]`` for supervised training."""
    pairs = _pairs(split, seed, digits, n_test)
    return [(format_prompt(a, b), format_response(a, b)) for a, b in pairs]


def toy_records(split: str, seed: int = 0, digits: int = DIGITS, n_test: int = N_TEST) -> list[dict]:
    """Rows in verl's RL parquet schema (as the real math data uses)."""
    rows = []
    for i, (prompt, truth) in enumerate(toy_problems(split, seed, digits, n_test)):
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": prompt}],
                "ability": ABILITY,
                "reward_model": {"ground_truth": truth, "style": "rule"},
                "extra_info": {"index": i, "raw_problem": prompt.strip(), "split": split},
            }
        )
    return rows


def write_parquet(
    path: str | Path, split: str, seed: int = 0, digits: int = DIGITS, n_test: int = N_TEST
) -> Path:
    """Write ``split`` as a verl-schema parquet file at ``path`` (atomic replace); return the path."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # one per writer:
    os.close(fd)  # runs that start together on one cache_dir each write their own, the last rename wins
    try:
        pd.DataFrame(toy_records(split, seed, digits, n_test)).to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def extract_answer(response: str) -> str | None:
    """Text after the last ``Answer:`` (same pattern as the ``math_dapo`` grader), stripped."""
    matches = _ANSWER_RE.findall(response[-300:])
    return matches[-1].strip() if matches else None


def is_correct(response: str, ground_truth: str) -> bool:
    """Exact-match check of the extracted answer; a quick stand-in for the full grader."""
    pred = extract_answer(response)
    return pred is not None and pred == ground_truth.strip()
