"""Paired comparisons of methods against a baseline, matched by seed: a t-interval, the exact sign-flip
p-value, the sign test's interval for the median difference, a verdict per comparison, and the verdicts
as sentences (tables/paired_vs_<baseline>.*, tables/verdicts.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis import style
from analysis.render import METRICS
from analysis.select import fmt


def method_order(scores: pd.DataFrame) -> list[str]:
    """The methods of ``scores`` in the paper's order of algorithms, then by name."""
    pairs = scores[["method", "algo"]].drop_duplicates()
    return [m for m, _ in sorted(zip(pairs["method"], pairs["algo"]), key=lambda p: (style.order_key(p[1]), p[0]))]


SIGN_MIN_COVERAGE = 0.9  # a sign interval counts as evidence from n = 5 (93.75%); n = 4 gives 87.5%


def paired_stats(d: np.ndarray, ci: float = 0.95) -> dict:
    """Paired differences ``d`` (one per seed): their mean with a t-interval (df = n - 1; exact when the
    differences are normal), the exact two-sided sign-flip p-value (no assumption beyond symmetry under no
    effect; with n pairs it cannot go below 2^(1-n)), and the sign test's interval for the median
    difference (:func:`sign_interval`: no assumption at all). ``verdict``: ``holds`` where the sign
    interval covers at least SIGN_MIN_COVERAGE (n >= 5) and excludes 0 (at n = 5: all five seeds on one
    side), ``t only`` where only the t-interval excludes 0, else ``not shown``."""
    n = len(d)
    out = {"mean_diff": float(d.mean()) if n else np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "p_signflip": np.nan, "min_p": 2.0 ** (1 - n) if n else np.nan, "median_diff": np.nan,
           "sign_low": np.nan, "sign_high": np.nan, "sign_coverage": np.nan, "verdict": "too few seeds",
           "n_pairs": n}
    if n < 2:
        return out
    half = stats.t.ppf((1 + ci) / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
    out["ci_low"], out["ci_high"] = out["mean_diff"] - half, out["mean_diff"] + half
    if n <= 20:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # every sign pattern
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(200_000, n))
    flipped = np.abs((signs * d).mean(axis=1))
    out["p_signflip"] = float(np.mean(flipped >= abs(out["mean_diff"]) - 1e-12))
    out["median_diff"] = float(np.median(d))
    out["sign_low"], out["sign_high"], out["sign_coverage"] = sign_interval(d, ci)
    excludes = lambda lo, hi: lo > 0 or hi < 0  # noqa: E731
    out["verdict"] = ("holds" if out["sign_coverage"] >= SIGN_MIN_COVERAGE and excludes(out["sign_low"], out["sign_high"])
                      else "t only" if excludes(out["ci_low"], out["ci_high"]) else "not shown")
    return out


def sign_interval(d: np.ndarray, ci: float = 0.95) -> tuple[float, float, float]:
    """The sign test's interval for the median of ``d``: [d_(k), d_(n+1-k)] of the sorted values, whose
    coverage 1 - 2 P(Binomial(n, 1/2) < k) holds for any continuous distribution. ``k`` is the largest with
    coverage >= ``ci``, else 1 (the range of ``d``). Returns (low, high, coverage): at n = 5 the range,
    93.75%; at n = 10, the 2nd to 9th values, 97.9%."""
    n, s = len(d), np.sort(d)
    coverage = lambda k: 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)  # noqa: E731
    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= ci:
        k += 1
    return float(s[k - 1]), float(s[n - k]), float(coverage(k))


PAIRED_COLUMNS = ["method", "baseline", "benchmark", "metric", "mean_diff", "ci_low", "ci_high", "p_signflip", "min_p",
                  "median_diff", "sign_low", "sign_high", "sign_coverage", "verdict", "n_pairs", "seeds"]


def paired(scores: pd.DataFrame, baseline: str, ci: float = 0.95) -> pd.DataFrame:
    """Each method minus the baseline, matched by seed: :func:`paired_stats` per (method, benchmark, metric).

    baseline: an algo name or a method label. Runs sharing (method, seed) are averaged first.
    """
    per = scores.melt(id_vars=["method", "algo", "seed", "benchmark"], value_vars=list(METRICS),
                      var_name="metric", value_name="value").dropna(subset=["value", "seed"])
    per = per.groupby(["method", "algo", "benchmark", "metric", "seed"], as_index=False)["value"].mean()
    base_rows = per[(per["algo"] == baseline) | (per["method"] == baseline)]
    if base_rows.empty:
        raise ValueError(f"baseline {baseline!r} has no finished run; methods: {sorted(per['method'].unique())}")
    base_label = base_rows["method"].iloc[0]
    base = per[per["method"] == base_label].set_index(["benchmark", "metric", "seed"])["value"]
    rows = []
    for (method, bench, metric), grp in per[per["method"] != base_label].groupby(["method", "benchmark", "metric"], sort=False):
        keyed = grp.set_index(["benchmark", "metric", "seed"])["value"]
        common = keyed.index.intersection(base.index)
        d = (keyed.loc[common] - base.loc[common]).to_numpy()
        rows.append({"method": method, "baseline": base_label, "benchmark": bench, "metric": metric,
                     **paired_stats(d, ci), "seeds": " ".join(str(s[2]) for s in common)})
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    order = {m: i for i, m in enumerate(method_order(scores))}
    return out.sort_values("method", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


VERDICT_TEXT = {"holds": "**holds** (the sign test's interval excludes 0)",
                "t only": "**t only** (only the t-interval excludes 0)", "not shown": "**not shown**",
                "too few seeds": "**too few seeds**"}


def verdicts(diff: pd.DataFrame, metric: str) -> str:
    """The paired comparisons as sentences: per baseline, benchmark and Last/Best, which methods are above
    or below it by each verdict, with the median difference and its interval."""
    eligible = diff[diff["sign_coverage"] >= SIGN_MIN_COVERAGE]
    chance = float((1 - eligible["sign_coverage"]).sum())
    lines = [f"# Paired comparisons: what holds ({metric})", "",
             f"{int((diff['verdict'] == 'holds').sum())} of {len(diff)} comparisons hold. Chance alone makes a "
             "comparison hold with probability 1 - coverage (at n = 5: all five seed pairs on one side, 1 in 16), so "
             f"with no real difference anywhere about {chance:.1f} of these {len(eligible)} would hold; each one "
             "below is one test, not corrected for the others.", ""]
    split = [c for c in diff.columns if c not in PAIRED_COLUMNS]
    for keys, grp in diff.groupby(["baseline", *split, "benchmark", "metric"], sort=False, dropna=False):
        base, *values, bench, what = keys
        where = "".join(f", {c}={fmt(v)}" for c, v in zip(split, values))
        lines.append(f"Against **{base}**, {style.bench_label(bench)} {what.capitalize()}{where}, "
                     f"n = {'/'.join(map(str, sorted(grp['n_pairs'].unique())))} seed pairs:")
        for verdict, text in VERDICT_TEXT.items():
            rows = grp[grp["verdict"] == verdict]
            if rows.empty:
                continue
            items = "; ".join(f"{r.method} {'above' if r.median_diff > 0 else 'below' if r.median_diff < 0 else 'level'}"
                              f" (median {r.median_diff:+.3f} [{r.sign_low:+.3f}, {r.sign_high:+.3f}],"
                              f" mean {r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}])"
                              for r in rows.itertuples())
            lines.append(f"- {text}: {items}")
        lines.append("")
    return "\n".join(lines)


PAIRED_HEAD = (
    "{metric}, each method minus {base}, matched by seed (n = seed pairs): the mean difference [95% t-interval, "
    "df = n - 1, exact if the differences are normal] and p, the exact two-sided sign-flip test's p-value (its "
    "smallest possible value with n pairs is 2^(1-n): 0.25 at n = 3, 0.0625 at n = 5, so no difference reaches "
    "p < 0.05 with fewer than 6 seeds); then the median difference [the sign test's interval, valid for any "
    "distribution; its coverage in parentheses: at n = 5 the range of the 5 differences, 93.75%] and the "
    "verdict: **holds** = the sign interval excludes 0 and covers >= 90% (n >= 5; at n = 5: every seed on the same "
    "side, which chance alone does 1 time in 16), **t only** = only the t-interval excludes 0 (it leans on "
    "normality), **not shown** = neither; tables/verdicts.md counts how many would hold by chance.")
