"""Evaluation metrics over k samples per problem (docs/algorithms.md section 8; paper Section 5, Appendix H).

Pure helpers on per-sample correctness flags and extracted answers; no model code.

- mean@k: average accuracy of the k samples of a problem (the paper's Mean@32 at temperature 1.0).
- pass@k: chance that at least one of k samples is correct, by the unbiased estimator
  ``1 - C(n-c, k) / C(n, k)`` from n samples of which c are correct (Chen et al., 2021).
- pass@k (bootstrap): draw k of the n samples *with replacement*, many times, and average "any
  correct". Its expectation is ``1 - (1 - c/n)^k``, below the unbiased value; offered to compare with
  numbers produced that way (the paper's Figure 7 code).
- maj@k: majority vote over the extracted (normalised) answers of the first k samples.
All metrics are averaged over problems with equal weight.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _check_nck(n: int, c: int, k: int) -> None:
    for label, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"pass@k: {label} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"pass@k: need at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: the number correct c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must lie in [1, n={n}]; draw at least k samples per problem")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which avoids huge binomials. It is 1 when
    fewer than k samples are wrong (every k-subset then holds a correct one).
    """
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def _as_bool_array(correct: Sequence[bool], what: str) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D sequence of correctness flags, got shape {arr.shape}")
    return arr.astype(bool)


def pass_at_k_bootstrap(
    correct: Sequence[bool],
    k: int,
    num_resamples: int = 1000,
    rng: np.random.Generator | int | None = 0,
) -> float:
    """pass@k by resampling k of the n samples with replacement ``num_resamples`` times.

    Expectation ``1 - (1 - c/n)^k``: lower than ``pass_at_k`` whenever 0 < c < n and k > 1.
    ``rng`` is a numpy Generator or a seed (default 0, so repeated calls agree).
    """
    flags = _as_bool_array(correct, "pass_at_k_bootstrap")
    _check_nck(len(flags), int(flags.sum()), k)
    if num_resamples < 1:
        raise ValueError(f"pass_at_k_bootstrap: num_resamples must be >= 1, got {num_resamples}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    draws = gen.integers(0, len(flags), size=(num_resamples, k))
    return float(flags[draws].any(axis=1).mean())


def mean_at_k(correct: Sequence[bool]) -> float:
    """Fraction of a problem's samples that are correct (mean@k with k = len(correct))."""
    return float(_as_bool_array(correct, "mean_at_k").mean())


def maj_at_k(preds: Sequence[str | None], correct: Sequence[bool], k: int | None = None) -> float:
    """1.0 if the most frequent answer among the first k samples is correct, else 0.0.

    ``preds`` are normalised answers (None: no answer, never voted for). Ties go to the answer that
    appears first in sample order, so the result does not depend on hashing. The winner's
    correctness is read from its first occurrence. No answer at all gives 0.0.
    """
    flags = _as_bool_array(correct, "maj_at_k")
    if len(preds) != len(flags):
        raise ValueError(f"maj_at_k: {len(preds)} predictions but {len(flags)} correctness flags")
    k = len(flags) if k is None else k
    if not 1 <= k <= len(flags):
        raise ValueError(f"maj_at_k: k={k} must lie in [1, {len(flags)}]")
    counts: dict[str, int] = {}
    first_index: dict[str, int] = {}
    for i, pred in enumerate(preds[:k]):
        if pred is None:
            continue
        counts[pred] = counts.get(pred, 0) + 1
        first_index.setdefault(pred, i)
    if not counts:
        return 0.0
    winner = max(counts, key=lambda p: (counts[p], -first_index[p]))
    return float(flags[first_index[winner]])


def group_by_problem(problem_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Row indices of each problem, problems in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for row, pid in enumerate(problem_ids):
        groups.setdefault(pid, []).append(row)
    return groups


def summarize_eval(
    problem_ids: Sequence[Hashable],
    preds: Sequence[str | None],
    correct: Sequence[bool],
    ks: Sequence[int] = (1, 8, 32),
    num_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics averaged over problems, one entry per sample row in the inputs.

    Returns ``mean@<n>`` (n = samples per problem) and, for each k in ``ks``: ``pass@<k>``
    (unbiased), ``pass@<k>_bootstrap`` and ``maj@<k>`` (vote over each problem's first k samples).
    Every problem must have the same number of samples n >= max(ks).
    """
    if not (len(problem_ids) == len(preds) == len(correct)):
        raise ValueError(
            f"summarize_eval: got {len(problem_ids)} problem ids, {len(preds)} predictions and "
            f"{len(correct)} correctness flags; give one of each per sample"
        )
    if len(problem_ids) == 0:
        raise ValueError("summarize_eval: no samples to evaluate")
    groups = group_by_problem(problem_ids)
    sizes = sorted({len(rows) for rows in groups.values()})
    if len(sizes) != 1:
        raise ValueError(f"summarize_eval: problems have different sample counts {sizes}; sample each problem equally")
    n = sizes[0]
    if not ks or max(ks) > n or min(ks) < 1:
        raise ValueError(f"summarize_eval: every k in ks={list(ks)} must lie in [1, {n}] (samples per problem)")
    flags = np.asarray(correct, dtype=bool)
    rng = np.random.default_rng(seed)
    totals: dict[str, float] = {f"mean@{n}": 0.0}
    for k in ks:
        totals.update({f"pass@{k}": 0.0, f"pass@{k}_bootstrap": 0.0, f"maj@{k}": 0.0})
    for rows in groups.values():
        problem_flags = flags[rows]
        problem_preds = [preds[r] for r in rows]
        totals[f"mean@{n}"] += mean_at_k(problem_flags)
        for k in ks:
            totals[f"pass@{k}"] += pass_at_k(n, int(problem_flags.sum()), k)
            totals[f"pass@{k}_bootstrap"] += pass_at_k_bootstrap(problem_flags, k, num_resamples, rng)
            totals[f"maj@{k}"] += maj_at_k(problem_preds, problem_flags, k)
    return {key: value / len(groups) for key, value in totals.items()}
