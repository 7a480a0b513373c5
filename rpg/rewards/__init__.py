"""Reward functions keyed by the ``data_source`` column of a prompt set, and safe ways to call them.

A ``RewardFn`` grades one response: ``fn(response, ground_truth) -> {"score", "acc", "pred"}``.
``score_safely`` wraps any of them so that an exception or a hang becomes a -1 score with an ``error``;
``score_batch`` does the same for a batch under one timer.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rpg.core.registry import Registry
from rpg.rewards.math import compute_score, compute_score_math_verify, overlong_penalty

RewardFn = Callable[[str, str], dict]

REWARDS: Registry = Registry("reward function (data_source)")
REWARDS.register("math_dapo", "aime2025", "amc_23", "toy")(compute_score)
REWARDS.register("math_verify")(compute_score_math_verify)

FAILED_SCORE = -1.0


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered under ``name``; a KeyError lists the valid names."""
    return REWARDS[name]


class RewardTimeout(TimeoutError):
    """A reward function ran past its time limit."""


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so that ``except Exception`` cannot swallow it."""


def _call_with_timer(fn: Callable, timeout_s: float, args: tuple, kwargs: dict) -> Any:
    """Main thread: interrupt ``fn`` with an interval timer; an enclosing timer is kept and re-armed.

    When the enclosing timer has less time left than ``timeout_s``, it is its deadline that runs out: its own
    handler is then called (the enclosing call times out), not a RewardTimeout of this one.
    """
    deadline = _Deadline()

    def on_alarm(signum, frame):
        raise deadline

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    capped = 0 < outer_delay <= timeout_s and callable(previous_handler)
    outer_expired = False
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, outer_delay if capped else timeout_s)
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline as exc:
        if exc is not deadline:
            raise
        if not capped:
            raise RewardTimeout(f"reward function did not finish within {timeout_s:g} s") from None
        outer_expired = True
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_delay > 0 and not outer_expired:  # give the enclosing timer what is left of its time
            left = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-4), outer_interval)
    previous_handler(signal.SIGALRM, None)  # the enclosing deadline has passed: deliver it now
    raise AssertionError("the enclosing SIGALRM handler returned")  # pragma: no cover


def _call_in_thread(fn: Callable, timeout_s: float, args: tuple, kwargs: dict) -> Any:
    """Other threads: run ``fn`` in a daemon worker; on timeout it is abandoned (it cannot be killed)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name="reward-with-timeout", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout(f"reward function did not finish within {timeout_s:g} s (worker thread left running)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_with_timeout(fn: Callable, timeout_s: float | None, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, raising ``RewardTimeout`` after ``timeout_s`` seconds (None: no limit).

    On the main thread a SIGALRM interval timer interrupts the call (nested calls are fine; code
    that sets its own ``signal.alarm`` inside would cancel ours). Elsewhere the call runs in a worker
    thread that is abandoned on timeout.
    """
    if timeout_s is None:
        return fn(*args, **kwargs)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds or None, got {timeout_s!r}")
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _call_with_timer(fn, float(timeout_s), args, kwargs)
    return _call_in_thread(fn, float(timeout_s), args, kwargs)


def _failure(message: str) -> dict:
    return {"score": FAILED_SCORE, "acc": False, "pred": None, "error": message}


def score_safely(fn: RewardFn, response: str, ground_truth: str, timeout_s: float | None = 5.0) -> dict:
    """``fn(response, ground_truth)`` that never raises (except KeyboardInterrupt / SystemExit).

    An exception, a timeout or a result without a numeric ``score`` gives
    ``{"score": -1.0, "acc": False, "pred": None, "error": <what happened>}``.
    """
    try:
        return call_with_timeout(_grade, timeout_s, fn, response, ground_truth)
    except RewardTimeout as exc:
        return _failure(f"timeout: {exc}")


def _grade(fn: RewardFn, response: str, ground_truth: str) -> dict:
    """``fn``'s result checked and completed, or a failure record for an exception or a malformed result."""
    try:
        result = fn(response, ground_truth)
    except Exception as exc:  # noqa: BLE001 - the point of score_safely
        return _failure(f"{type(exc).__name__}: {exc}")
    if not isinstance(result, Mapping) or "score" not in result:
        return _failure(f"reward function returned {type(result).__name__}, expected a dict with a 'score' key")
    try:
        score = float(result["score"])
    except (TypeError, ValueError):
        return _failure(f"reward function returned a non-numeric score {result['score']!r}")
    out = dict(result)
    out["score"] = score
    out.setdefault("acc", score > 0)
    out.setdefault("pred", None)
    return out


def _grade_into(results: list, fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[str]) -> None:
    for i in range(len(results), len(responses)):
        results.append(_grade(fn, responses[i], ground_truths[i]))


def score_batch(
    name_or_fn: str | RewardFn,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    timeout_s: float | None = 5.0,
) -> list[dict]:
    """``score_safely`` for every response, with one timer for the whole batch instead of one per response.

    ``timeout_s`` is still the limit of each response: when the batch's timer fires, the response being
    graded is graded again alone under its own timer (a failure only if it alone runs past ``timeout_s``),
    and the rest of the batch continues under a new timer.  A hung grader costs at most 2 x ``timeout_s``.
    A name is looked up in ``REWARDS``.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths; give one per response")
    fn = get_reward_fn(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        # no timer to share: off the main thread each call runs in a worker thread of its own
        return [score_safely(fn, r, gt, timeout_s) for r, gt in zip(responses, ground_truths)]
    results: list[dict] = []
    while len(results) < len(responses):
        try:
            call_with_timeout(_grade_into, timeout_s, results, fn, responses, ground_truths)
        except RewardTimeout:
            i = len(results)
            if i == len(responses):  # the timer fired after the last response was graded
                break
            results.append(score_safely(fn, responses[i], ground_truths[i], timeout_s))
    return results


__all__ = [
    "REWARDS",
    "RewardFn",
    "RewardTimeout",
    "call_with_timeout",
    "compute_score",
    "compute_score_math_verify",
    "get_reward_fn",
    "overlong_penalty",
    "score_batch",
    "score_safely",
]
