"""The math_dapo grader, the math-verify option, the registry and the never-raising wrapper."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest

from rpg.data import load_prompt_set
from rpg.rewards import (
    REWARDS,
    RewardTimeout,
    call_with_timeout,
    get_reward_fn,
    score_batch,
    score_safely,
)
from rpg.rewards.math import (
    TAIL_CHARS,
    compute_score,
    compute_score_math_verify,
    extract_answer,
    normalize_answer,
    overlong_penalty,
)

BENCH_DIR = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
BENCH_FILES = ("aime-2024.parquet", "aime25.parquet", "amc-23.parquet")
REASONING = "Let me work through this step by step.\nSo the value follows from the equation above.\n"


def _benchmark_truths() -> list[str]:
    truths: set[str] = set()
    for file in BENCH_FILES:
        truths.update(load_prompt_set(BENCH_DIR / file).ground_truths)
    return sorted(truths)


def _other_number(truth: str) -> str:
    """A different number than the one in ``truth`` (e.g. 336^\\circ -> 337)."""
    match = re.search(r"-?\d+", truth)
    assert match is not None, truth
    return str(int(match.group()) + 1)


@pytest.mark.parametrize("truth", _benchmark_truths())
def test_every_benchmark_answer_graded_right_and_wrong(truth):
    right = compute_score(REASONING + f"Answer: {truth}", truth)
    assert right == {"score": 1.0, "acc": True, "pred": normalize_answer(truth)}
    wrong = compute_score(REASONING + f"Answer: {_other_number(truth)}", truth)
    assert wrong["score"] == -1.0 and wrong["acc"] is False


def test_benchmarks_hold_the_expected_answers():
    truths = _benchmark_truths()
    assert "336^\\circ" in truths and "-1" in truths
    assert len(truths) > 60  # 29 + 30 + 25 distinct answers, some shared across files


@pytest.mark.parametrize(
    ("pred", "truth"),
    [
        ("336", "336^\\circ"),
        ("336^\\circ", "336"),
        ("336^{\\circ}", "336"),
        ("336°", "336^\\circ"),
        ("\\boxed{12}", "12"),
        ("$\\boxed{12}$", "12"),
        ("$1,000$", "1000"),
        ("1,000", "1000"),
        ("1\\,000", "1000"),
        ("-1", "-1"),
        ("\u22121", "-1"),  # Unicode minus
        ("$-1$", "-1"),
        ("-1,000", "-1000"),
        ("12.", "12"),
        ("12.0", "12"),
        ("**12**", "12"),
        ("x = 12", "12"),
        ("\\boxed{x = 12}", "12"),
        ("\\(12\\)", "12"),
        ("\\text{12}", "12"),
        ("12 \\text{ cm}", "12"),
        ("12\\text{ cm}^2", "12"),
        ("12 degrees", "12"),
        ("12 ways", "12"),
        ("\\$12", "12"),
        ("50\\%", "50"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("a 12", "12"),
        ("(1, 2)", "(1,2)"),
    ],
)
def test_equivalent_spellings_are_correct(pred, truth):
    assert compute_score(f"{REASONING}Answer: {pred}", truth)["acc"] is True


@pytest.mark.parametrize(
    ("pred", "truth"),
    [
        ("1", "-1"),
        ("-12", "12"),
        ("1,2", "12"),  # a pair, not a thousands separator
        ("12", "120"),
        ("a + b", "+b"),  # "a" is a variable here, not an article
        ("13 cm", "12"),
        ("\\frac{1}{2}", "0.5"),  # no numeric evaluation in the string grader
        ("", "12"),
    ],
)
def test_different_answers_are_wrong(pred, truth):
    result = compute_score(f"{REASONING}Answer: {pred}", truth)
    assert result["score"] == -1.0 and result["acc"] is False


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("336^\\circ", "336"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("$1,000$", "1000"), ("0.50", "0.5"),
     ("-0", "0"), ("1,2", "1,2"), ("x=\\text{5}", "5"), ("**7**.", "7"), ("3 \\text{ and } 4", "3,4")],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_only_the_last_300_characters_are_read():
    early = "Answer: 12\n" + "x" * TAIL_CHARS  # the Answer line sits just outside the tail
    assert compute_score(early, "12") == {"score": -1.0, "acc": False, "pred": None}
    inside = "Answer: 12\n" + "x" * (TAIL_CHARS - len("Answer: 12\n") - 1)
    assert len(inside) < TAIL_CHARS and compute_score(inside, "12")["acc"] is True


def test_last_answer_line_wins_and_case_is_ignored():
    response = "answer: 7\nWait, I made a mistake.\nANSWER :  12\n"
    assert extract_answer(response) == "12"
    assert compute_score(response, "12") == {"score": 1.0, "acc": True, "pred": "12"}
    assert compute_score(response, "7")["acc"] is False


def test_no_answer_line_scores_minus_one():
    assert compute_score("The result is \\boxed{12}.", "12") == {"score": -1.0, "acc": False, "pred": None}
    assert compute_score("", "12")["score"] == -1.0


@pytest.mark.parametrize(
    ("length", "expected"),
    # max_len=100, buffer=20: free up to 80 tokens, then -(length-80)/20, at most -1
    [(0, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (99, -0.95), (100, -1.0), (150, -1.0)],
)
def test_overlong_penalty(length, expected):
    assert overlong_penalty(length, max_len=100, buffer=20) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("max_len", "buffer", "length"), [(100, 0, 10), (100, 101, 10), (0, 0, 0), (100, 20, -1)])
def test_overlong_penalty_rejects_bad_arguments(max_len, buffer, length):
    with pytest.raises(ValueError, match="overlong_penalty"):
        overlong_penalty(length, max_len, buffer)


def test_math_verify_accepts_symbolic_equivalents():
    assert compute_score_math_verify(f"{REASONING}Answer: 0.5", "\\frac{1}{2}")["acc"] is True
    assert compute_score_math_verify(f"{REASONING}Answer: \\sqrt{{2}}/2", "\\frac{\\sqrt{2}}{2}")["acc"] is True
    wrong = compute_score_math_verify(f"{REASONING}Answer: 3", "2")
    assert wrong["score"] == -1.0 and wrong["acc"] is False
    assert compute_score_math_verify("no answer line, \\boxed{2}", "2")["pred"] is None


def test_math_verify_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(compute_score_math_verify("Answer: 0.5", "\\frac{1}{2}")))
    worker.start()
    worker.join(30)
    assert results and results[0]["acc"] is True and "error" not in results[0]


def test_registry_maps_data_sources():
    assert set(REWARDS) == {"math_dapo", "aime2025", "amc_23", "toy", "math_verify"}
    for name in ("math_dapo", "aime2025", "amc_23", "toy"):
        assert get_reward_fn(name) is compute_score
    assert get_reward_fn("math_verify") is compute_score_math_verify
    with pytest.raises(KeyError, match="valid names: aime2025, amc_23, math_dapo, math_verify, toy"):
        get_reward_fn("gsm8k")


def _raises(response, ground_truth):
    raise RuntimeError("grader exploded")


def test_score_safely_turns_an_exception_into_minus_one():
    assert score_safely(_raises, "Answer: 1", "1") == {
        "score": -1.0, "acc": False, "pred": None, "error": "RuntimeError: grader exploded"
    }


@pytest.mark.parametrize("how", ["sleep", "busy"])
def test_score_safely_stops_a_hanging_reward_on_the_main_thread(how):
    def hang(response, ground_truth):
        if how == "sleep":
            time.sleep(30)
        while True:
            pass

    handler_before = signal.getsignal(signal.SIGALRM)
    timer_before = signal.getitimer(signal.ITIMER_REAL)[0]  # nonzero under e.g. pytest-timeout's signal method
    started = time.monotonic()
    result = score_safely(hang, "Answer: 1", "1", timeout_s=0.2)
    elapsed = time.monotonic() - started
    assert result["score"] == -1.0 and result["acc"] is False and result["error"].startswith("timeout")
    assert 0.19 <= elapsed < 2.0
    assert signal.getsignal(signal.SIGALRM) is handler_before
    timer_after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert timer_after == 0.0 if timer_before == 0.0 else 0.0 < timer_after <= timer_before


def test_score_safely_stops_a_hanging_reward_in_a_worker_thread():
    release = threading.Event()
    results = []

    def hang(response, ground_truth):
        release.wait(30)
        return {"score": 1.0}

    caller = threading.Thread(target=lambda: results.append(score_safely(hang, "Answer: 1", "1", timeout_s=0.2)))
    started = time.monotonic()
    caller.start()
    caller.join(10)
    elapsed = time.monotonic() - started
    release.set()
    assert results and results[0]["score"] == -1.0 and "worker thread" in results[0]["error"]
    assert elapsed < 2.0


def test_score_safely_passes_good_results_and_rejects_malformed_ones():
    assert score_safely(compute_score, "Answer: 12", "12") == {"score": 1.0, "acc": True, "pred": "12"}
    assert score_safely(lambda r, g: {"score": 0.5}, "", "") == {"score": 0.5, "acc": True, "pred": None}
    bad = score_safely(lambda r, g: 1.0, "", "")
    assert bad["score"] == -1.0 and "expected a dict" in bad["error"]
    bad = score_safely(lambda r, g: {"score": "high"}, "", "")
    assert bad["score"] == -1.0 and "non-numeric" in bad["error"]


def test_nested_timeouts_keep_the_outer_deadline():
    def inner_then_hang():
        assert call_with_timeout(lambda: 5, 10.0) == 5  # must not cancel the outer 0.3 s timer
        time.sleep(30)

    started = time.monotonic()
    with pytest.raises(RewardTimeout):
        call_with_timeout(inner_then_hang, 0.3)
    assert time.monotonic() - started < 2.0
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        call_with_timeout(lambda: 1, 0)


def test_score_batch():
    results = score_batch("amc_23", ["Answer: -1", "Answer: 1", "nothing"], ["-1", "-1", "-1"])
    assert [r["score"] for r in results] == [1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="one per response"):
        score_batch("amc_23", ["Answer: 1"], [])


def test_score_batch_fails_only_the_hung_response_and_goes_on():
    calls = []

    def grader(response, ground_truth):
        calls.append(response)
        if response == "hang":
            time.sleep(30)
        return compute_score(response, ground_truth)

    responses = ["Answer: 3"] * 10 + ["hang"] + ["Answer: 3", "Answer: 4"] * 5
    started = time.monotonic()
    results = score_batch(grader, responses, ["3"] * len(responses), timeout_s=0.2)
    assert time.monotonic() - started < 2.0  # at most 2 x the limit for the hang, not 30 s
    assert results[10]["score"] == -1.0 and results[10]["error"].startswith("timeout")
    assert [r["score"] for i, r in enumerate(results) if i != 10] == [1.0] * 10 + [1.0, -1.0] * 5
    assert calls.count("hang") == 2  # graded again alone before it is called a failure


def test_score_batch_limits_each_response_not_the_batch():
    """30 responses of 20 ms each outlast one 0.2 s timer; none of them is a timeout."""
    def slow(response, ground_truth):
        time.sleep(0.02)
        return compute_score(response, ground_truth)

    results = score_batch(slow, ["Answer: 1"] * 30, ["1"] * 30, timeout_s=0.2)
    assert [r["score"] for r in results] == [1.0] * 30


def test_score_batch_with_graders_that_set_their_own_timer():
    """A grader with its own inner timeout (as compute_score_math_verify) under the batch's timer: when the
    batch's deadline comes first, that is the batch's timeout (the response is graded again alone), not a
    failure of the grader's inner call."""
    def nested(response, ground_truth):
        inner = call_with_timeout(lambda: (time.sleep(0.12), compute_score(response, ground_truth))[1], 0.4)
        return inner

    results = score_batch(nested, ["Answer: 2"] * 8, ["2"] * 8, timeout_s=0.5)
    assert [r["score"] for r in results] == [1.0] * 8, [r.get("error") for r in results]
