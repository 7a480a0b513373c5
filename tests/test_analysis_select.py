"""The analysis never averages runs that differ in more than the seed: on a real MLflow sqlite store with
mixed contexts, mixed run lengths and a configuration run twice, each table holds only like runs."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param

from analysis.__main__ import main


def log_run(client, exp, algo, seed, values, params, config_hash, steps=(0, 10, 20)):
    """One finished run with eval/toy/mean_at_4 = ``values`` at ``steps``."""
    run_id = client.create_run(exp, run_name=f"{algo}-s{seed}-{config_hash}",
                               tags={"algo": algo, "seed": str(seed), "config_hash": config_hash}).info.run_id
    client.log_batch(run_id, metrics=[Metric("eval/toy/mean_at_4", v, 1000 + s, s) for s, v in zip(steps, values)],
                     params=[Param(k, str(v)) for k, v in {"algo.kl_coef": 0.1, **params}.items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """2 contexts x 2 algos x 2 seeds, one 100-step GRPO run, and GRPO seed 1 at 2048 run a second time."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('select') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("mixed")
    for ctx, base in ((2048, 0.2), (4096, 0.6)):
        for algo, gain in (("grpo", 0.0), ("rpg_fkl", 0.1)):
            for seed in (1, 2):
                # step 0 (the base model) is the highest value of rpg_fkl at 4096: Best must not take it
                start = 0.95 if (algo, ctx) == ("rpg_fkl", 4096) else base
                log_run(client, exp, algo, seed, [start, base + gain, base + gain + 0.01 * seed],
                        {"data.max_response_len": ctx, "steps": 20}, f"{algo}-{ctx}-{seed}")
    log_run(client, exp, "grpo", 3, [0.2, 0.5, 0.9], {"data.max_response_len": 2048, "steps": 100},
            "grpo-long", steps=(0, 50, 100))
    again = log_run(client, exp, "grpo", 1, [0.2, 0.3, 0.31], {"data.max_response_len": 2048, "steps": 20},
                    "grpo-2048-1")  # the same command again: counted once, the latest
    return uri, again


def tables(store, tmp_path, *extra):
    uri, _ = store
    assert main(["--experiment", "mixed", "--tracking-uri", uri, "--out", str(tmp_path), "--no-cache",
                 "--only", "table,paired,status", *extra]) == 0
    out = tmp_path / "tables"
    return pd.read_csv(out / "last_best.csv"), out


def test_contexts_and_lengths_get_tables_of_their_own(store, tmp_path, capsys):
    table, out = tables(store, tmp_path)
    assert (out / "last_best.md").read_text() in capsys.readouterr().out  # the command prints the main table
    cells = {(r.algo, r.data_len, r.steps, r.metric): r for r in
             table.rename(columns={"data.max_response_len": "data_len"}).itertuples()}
    assert set(cells) == {(a, c, 20, m) for a in ("grpo", "rpg_fkl") for c in (2048, 4096) for m in ("last", "best")} \
        | {("grpo", 2048, 100, m) for m in ("last", "best")}
    assert all(r.n == 2 for k, r in cells.items() if k[2] == 20)  # two seeds each, never 4 or 5
    assert cells[("grpo", 2048, 100, "last")].n == 1
    assert cells[("grpo", 2048, 20, "last")].mean == pytest.approx((0.31 + 0.22) / 2)  # latest duplicate
    assert cells[("rpg_fkl", 4096, 20, "best")].mean == pytest.approx((0.71 + 0.72) / 2)  # not step 0's 0.95
    md = (out / "last_best.md").read_text()
    assert "One table per data.max_response_len, steps" in md
    for heading in ("## data.max_response_len=2048, steps=20", "## data.max_response_len=4096, steps=20",
                    "## data.max_response_len=2048, steps=100"):
        assert heading in md
    paired = pd.read_csv(out / "paired_vs_grpo.csv")  # against the GRPO of the same context only
    got = paired.set_index(["data.max_response_len", "metric"])["mean_diff"]
    assert got[(2048, "last")] == pytest.approx((0.31 - 0.31 + 0.32 - 0.22) / 2)
    assert got[(4096, "last")] == pytest.approx(0.1)


def test_a_configuration_run_twice_counts_once(store, tmp_path):
    _, again = store
    _, out = tables(store, tmp_path)
    status = pd.read_csv(out / "status.csv")
    left = status[~status["included"]]
    assert len(left) == 1 and left["run_id"].iloc[0] != again
    assert "same config_hash as grpo-s1-grpo-2048-1" in left["counted"].iloc[0]


def test_where_picks_one_table(store, tmp_path):
    table, out = tables(store, tmp_path, "--where", "data.max_response_len=4096", "--where", "steps=20")
    assert set(table["n"]) == {2} and set(table["algo"]) == {"grpo", "rpg_fkl"}
    md = (out / "last_best.md").read_text()
    assert "Filters: data.max_response_len=4096, steps=20." in md and "One table per" not in md
    assert main(["--experiment", "mixed", "--tracking-uri", store[0], "--out", str(tmp_path), "--no-cache",
                 "--only", "table", "--where", "data.max_len=1"]) == 2  # a key no run has: refused


def test_best_may_include_step0_when_asked(store, tmp_path):
    table, _ = tables(store, tmp_path, "--best-includes-step0", "--where", "data.max_response_len=4096")
    best = table[(table["algo"] == "rpg_fkl") & (table["metric"] == "best")]
    assert best["mean"].iloc[0] == pytest.approx(0.95)


def test_a_figure_of_unlike_runs_is_refused_until_one_setting_is_picked(store, tmp_path, capsys):
    uri, _ = store
    args = ["--experiment", "mixed", "--tracking-uri", uri, "--out", str(tmp_path), "--no-cache",
            "--only", "dynamics", "--formats", "png"]
    assert main(args) == 2
    assert "the runs differ in data.max_response_len, steps" in capsys.readouterr().err
    assert main(args + ["--where", "data.max_response_len=4096", "--where", "steps=20"]) == 0
    assert (tmp_path / "figures" / "dynamics.png").is_file()


def test_other_groupings_never_average_unlike_runs(tmp_path):
    """--group-by algo,X still splits an algorithm's ablation; a grouping without algo splits the tables by
    algorithm instead of averaging algorithms."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("abl")
    for clip, gain in ((0.1, 0.0), (0.2, 0.2)):
        for seed in (1, 2):
            log_run(client, exp, "grpo", seed, [0.1, 0.3 + gain, 0.3 + gain], {"algo.clip_low": clip,
                    "optim.lr": 1e-4}, f"g-{clip}-{seed}")
    log_run(client, exp, "dapo", 1, [0.1, 0.9, 0.9], {"algo.clip_low": 0.2, "optim.lr": 1e-4}, "d-1")

    def last(*extra):
        assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(tmp_path), "--no-cache",
                     "--only", "table", *extra]) == 0
        table = pd.read_csv(tmp_path / "tables" / "last_best.csv")
        return table[table["metric"] == "last"]

    rows = last("--group-by", "algo,optim.lr")
    assert sorted(rows["n"]) == [1, 2, 2] and sorted(rows["mean"].round(6)) == [0.3, 0.5, 0.9]
    assert any("clip_low=0.1" in m for m in rows["method"])
    rows = last("--group-by", "optim.lr")
    assert sorted(rows["n"]) == [1, 2, 2]  # one table per algorithm (and clip), never one average
    assert "One table per algo, algo.clip_low" in (tmp_path / "tables" / "last_best.md").read_text()


def test_runs_ending_at_different_steps_are_flagged_in_both_formats(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("uneven")
    log_run(client, exp, "grpo", 1, [0.1, 0.3, 0.4], {}, "u1")
    log_run(client, exp, "grpo", 2, [0.1, 0.3], {}, "u2", steps=(0, 10))  # stopped early
    assert main(["--experiment", "uneven", "--tracking-uri", uri, "--out", str(tmp_path), "--no-cache",
                 "--only", "table"]) == 0
    md, tex = ((tmp_path / "tables" / f"last_best.{x}").read_text() for x in ("md", "tex"))
    assert "**Runs of a method end at different steps**" in md
    assert r"\textbf{Runs of a method end at different steps}" in tex and "**" not in tex
