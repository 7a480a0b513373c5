"""`python -m analysis` tables on a real MLflow sqlite store with known histories: Last/Best mean, std,
n and ranks; RUNNING/FAILED runs reported and never averaged; paired differences; paper numbers."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric

from analysis.__main__ import main

TOL = 1e-12  # values go through float64 and CSV repr: exact up to round-off
STEPS = (0, 10, 20)
# value of eval/<bench>/mean_at_4 at STEPS, per (algo, seed); designed so Last != Best for some runs
HIST = {
    ("grpo", 1): {"aime24": [0.10, 0.30, 0.20], "amc23": [0.50, 0.60, 0.70]},
    ("grpo", 2): {"aime24": [0.10, 0.25, 0.25], "amc23": [0.50, 0.55, 0.65]},
    ("grpo", 3): {"aime24": [0.15, 0.20, 0.30], "amc23": [0.40, 0.70, 0.60]},
    ("rpg_ufkl", 1): {"aime24": [0.10, 0.40, 0.35], "amc23": [0.50, 0.80, 0.75]},
    ("rpg_ufkl", 2): {"aime24": [0.20, 0.45, 0.50], "amc23": [0.60, 0.70, 0.80]},
    ("rpg_ufkl", 3): {"aime24": [0.10, 0.30, 0.40], "amc23": [0.55, 0.65, 0.70]},
    ("dapo", 1): {"aime24": [0.10, 0.35, 0.30], "amc23": [0.50, 0.70, 0.72]},
    ("dapo", 2): {"aime24": [0.10, 0.32, 0.31], "amc23": [0.50, 0.71, 0.70]},
}
LEFT_OUT = {("grpo", 4, "RUNNING"), ("rpg_ufkl", 5, "FAILED")}  # would top every column if averaged


def log_run(client, exp, algo, seed, hist, status):
    run_id = client.create_run(exp, run_name=f"{algo}-s{seed}", tags={"algo": algo, "seed": str(seed)}).info.run_id
    client.log_param(run_id, "algo.kl_coef", "0.0001")
    ms = [Metric(f"eval/{b}/mean_at_4", v, 1000 + s, s) for b, vals in hist.items() for s, v in zip(STEPS, vals)]
    ms += [Metric("train/score_mean", 0.5, 1000 + s, s) for s in range(21)]
    client.log_batch(run_id, metrics=ms)
    if status != "RUNNING":
        client.set_terminated(run_id, status)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('tables') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("tab")
    for (algo, seed), hist in HIST.items():
        log_run(client, exp, algo, seed, hist, "FINISHED")
    for algo, seed, status in LEFT_OUT:
        log_run(client, exp, algo, seed, {"aime24": [0.9, 0.99, 0.99], "amc23": [0.9, 0.99, 0.99]}, status)
    return uri


@pytest.fixture(scope="module")
def out(uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert main(["--experiment", "tab", "--tracking-uri", uri, "--out", str(out), "--only", "table,paired,status",
                 "--paper-table", "3"]) == 0
    return out / "tables"


def expected(algo, bench, metric, last_index=-1):
    vals = [np.max(h[bench][1: len(STEPS) + last_index + 1]) if metric == "best" else h[bench][last_index]
            for (a, _), h in HIST.items() if a == algo]
    return np.mean(vals), (np.std(vals, ddof=1) if len(vals) > 1 else np.nan), len(vals)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_last_best_numbers_exact(out):
    table = read(out / "last_best.csv")
    assert len(table) == 3 * 2 * 2  # methods x benchmarks x {last, best}
    for row in table.itertuples():
        mean, std, n = expected(row.algo, row.benchmark, row.metric)
        assert abs(row.mean - mean) <= TOL and abs(row.std - std) <= TOL and row.n == n, row
        assert row.final_step_min == row.final_step_max == 20
    got = table.set_index(["algo", "benchmark", "metric"])
    # hand-checked cells: grpo aime24 Last = mean(0.2, 0.25, 0.3) = 0.25; Best = mean(0.3, 0.25, 0.3)
    assert abs(got.loc[("grpo", "aime24", "last"), "mean"] - 0.25) <= TOL
    assert abs(got.loc[("grpo", "aime24", "best"), "mean"] - 0.85 / 3) <= TOL
    assert abs(got.loc[("grpo", "aime24", "last"), "std"] - 0.05) <= TOL
    assert got.loc[("dapo", "aime24", "last"), "n"] == 2
    assert got.loc[("dapo", "aime24", "last"), "seeds"] == "1 2"
    # ranks per column: rpg_ufkl best, dapo second on aime24 Last (0.4167 > 0.305 > 0.25)
    assert got.loc[("rpg_ufkl", "aime24", "last"), "rank"] == 1
    assert got.loc[("dapo", "aime24", "last"), "rank"] == 2
    assert got.loc[("grpo", "aime24", "last"), "rank"] == 3
    assert got.loc[("grpo", "aime24", "last"), "paper"] == 0.375  # Table 3, GRPO, AIME24 Last


def test_markdown_and_latex(out):
    md = (out / "last_best.md").read_text()
    assert "| RPG-UFKL | 3 | **0.4167 ± 0.0764** |" in md  # mean(0.35, 0.5, 0.4), std 0.0764
    assert "<u>0.3050 ± 0.0071</u>" in md  # DAPO second on AIME24 Last
    assert "| GRPO | 3 | 0.2500 ± 0.0500 |" in md
    assert "*0.3750*" in md and "↳ paper (GRPO)" in md
    assert "**Warning:** 2 run(s) not averaged" in md
    tex = (out / "last_best.tex").read_text()
    assert r"\textbf{0.4167 $\pm$ 0.0764}" in tex and r"\underline{0.3050 $\pm$ 0.0071}" in tex
    assert r"\multicolumn{2}{c}{AIME24}" in tex and tex.count(r"\\") == 2 + 3 + 3  # 2 header rows, 3 methods, 3 paper rows


def test_running_and_failed_runs_reported_not_averaged(out):
    status = read(out / "status.csv")
    left = status[~status["included"]]
    assert {(r.algo, r.seed, r.status) for r in left.itertuples()} == LEFT_OUT
    assert status["included"].sum() == len(HIST)
    assert "not averaged" in (out / "status.md").read_text()
    table = read(out / "last_best.csv")
    assert table["mean"].max() < 0.9  # the 0.99 values of the left-out runs are nowhere
    assert set(table["n"]) == {2, 3}


def test_paired_vs_baseline(out):
    diff = read(out / "paired_vs_grpo.csv").set_index(["method", "benchmark", "metric"])
    for (method, bench, metric), row in diff.iterrows():
        algo = {"RPG-UFKL": "rpg_ufkl", "DAPO": "dapo"}[method]
        seeds = [s for (a, s) in HIST if a == algo]
        pick = (lambda v: max(v[1:])) if metric == "best" else (lambda v: v[-1])
        d = [pick(HIST[(algo, s)][bench]) - pick(HIST[("grpo", s)][bench]) for s in seeds]
        assert abs(row["mean_diff"] - np.mean(d)) <= TOL and row["n_pairs"] == len(d)
        assert row["ci_low"] < row["mean_diff"] < row["ci_high"] and row["min_p"] == 2.0 ** (1 - len(d))
    # RPG-UFKL - GRPO on AMC23 Last, seeds 1-3: d = (0.05, 0.15, 0.10): all positive, so the sign-flip p is
    # 2/8; t-interval 0.10 +- 4.3027 * 0.05 / sqrt(3)
    row = diff.loc[("RPG-UFKL", "amc23", "last")]
    assert row["p_signflip"] == pytest.approx(0.25)
    assert row["ci_high"] - row["mean_diff"] == pytest.approx(4.302653 * 0.05 / 3 ** 0.5, rel=1e-6)
    assert "RPG-UFKL" in (out / "paired_vs_grpo.md").read_text()


def test_last_step_option_and_errors(uri, tmp_path):
    assert main(["--experiment", "tab", "--tracking-uri", uri, "--out", str(tmp_path), "--only", "table",
                 "--last-step", "10", "--no-cache"]) == 0
    table = read(tmp_path / "tables" / "last_best.csv")
    for row in table.itertuples():
        mean, _, _ = expected(row.algo, row.benchmark, row.metric, last_index=-2)
        assert abs(row.mean - mean) <= TOL, row
    assert main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path), "--only", "table"]) == 2
    assert main(["--experiment", "tab", "--tracking-uri", uri, "--out", str(tmp_path), "--only", "table",
                 "--k", "32"]) == 2  # mean@32 was not logged


def test_paper_numbers_file():
    rows = list(csv.DictReader(open(Path(__file__).parents[1] / "analysis" / "paper_numbers.csv")))
    assert len(rows) == 36 + 48 + 24 + 32 + 72  # Tables 3, 5, 6, 7, 8
    by = {(r["table"], r["algo"], r["benchmark"], r["metric"]): r for r in rows}
    assert by[("3", "rpg_urkl", "aime25", "last")]["value"] == "0.5261" and "typo" in by[("3", "rpg_urkl", "aime25", "last")]["note"]
    assert by[("5", "rpg_rf_urkl", "aime24", "best")]["value"] == "0.4531"
    assert by[("8", "reinforce_pp_baseline", "amc23", "last")]["value"] == "0.8711"
    flagged = [r for r in rows if float(r["value"]) > float(by[(r["table"], r["algo"], r["benchmark"], "best")]["value"])]
    assert [(r["table"], r["method"], r["benchmark"]) for r in flagged] == [("3", "RPG-URKL", "aime25")]


def test_paired_stats_by_hand():
    from analysis.paired import paired_stats

    one = paired_stats(np.array([0.02]))
    assert one["n_pairs"] == 1 and np.isnan(one["ci_low"]) and np.isnan(one["p_signflip"])  # too few seeds
    tied = paired_stats(np.array([1.0, -1.0]))
    assert tied["mean_diff"] == 0 and tied["p_signflip"] == 1.0
    s = paired_stats(np.array([1.0, 2.0, 3.0]))  # mean 2, sd 1: half-width t(0.975, 2) / sqrt(3)
    assert s["ci_low"] == pytest.approx(2 - 4.302653 / 3 ** 0.5, rel=1e-6)
    assert s["p_signflip"] == pytest.approx(0.25) and s["min_p"] == 0.25
    five = paired_stats(np.array([0.3, 0.1, 0.2, 0.05, 0.4]))  # all positive: 2 of 32 patterns
    assert five["p_signflip"] == pytest.approx(2 / 32)
    mixed = paired_stats(np.array([0.3, 0.1, 0.2, -0.05, 0.4]))  # |sum| >= 0.95 also with -0.05 flipped
    assert mixed["p_signflip"] == pytest.approx(4 / 32)


def test_sign_interval_and_verdicts_by_hand():
    from analysis.paired import paired_stats, sign_interval, verdicts

    five = paired_stats(np.array([0.3, 0.1, 0.2, 0.05, 0.4]))  # every seed above: the range, 1 - 2/32
    assert (five["sign_low"], five["sign_high"], five["sign_coverage"]) == (0.05, 0.4, pytest.approx(0.9375))
    assert five["median_diff"] == 0.2 and five["verdict"] == "holds"
    mixed = paired_stats(np.array([0.3, 0.2, 0.25, -0.02, 0.35]))  # one seed below: the range holds 0
    assert mixed["verdict"] == "t only" and mixed["ci_low"] > 0 and mixed["sign_low"] == -0.02
    four = paired_stats(np.array([0.3, 0.2, 0.25, 0.22]))  # all above, but 4 seeds cover only 87.5%
    assert four["sign_coverage"] == pytest.approx(0.875) and four["verdict"] == "t only"
    assert paired_stats(np.array([0.3, -0.1, 0.2, -0.2, 0.1]))["verdict"] == "not shown"
    d = np.arange(1.0, 11.0)  # n = 10: the 2nd to 9th values, 1 - 2 * 11/1024
    assert sign_interval(d) == (2.0, 9.0, pytest.approx(1 - 22 / 1024))
    rows = [{"method": m, "baseline": "GRPO", "benchmark": "toy", "metric": "last", "seeds": "1 2 3 4 5",
             **paired_stats(np.array(v))} for m, v in (("A", [0.3, 0.1, 0.2, 0.05, 0.4]), ("B", [-0.1, 0.1, 0, 0, 0.05]))]
    text = verdicts(pd.DataFrame(rows), "mean@4")
    assert "- **holds** (the sign test's interval excludes 0): A above (median +0.200 [+0.050, +0.400]" in text
    assert "- **not shown**: B above (median +0.000" not in text and "B level" in text
