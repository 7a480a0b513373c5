"""The paper's tables from a loaded sweep: Last/Best per method and benchmark over seeds, paired
differences against a baseline, and the runs that were left out.

Definitions (paper, Tables 3 and 5-8; docs/algorithms.md section 8), for the metric eval/<bench>/<stat>@<k>:
  Last = the value at the run's final logged step (or at ``last_step`` when given),
  Best = the max over the run's evaluated steps (up to ``last_step`` when given).
Each cell is mean +- sample std (ddof=1) over the runs (seeds) of a method, with n = number of runs.
Only runs whose status is in ``statuses`` (default FINISHED) are averaged; the others are listed in
the status table and named in a warning, never averaged silently.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from analysis.load import Sweep
from analysis.render import METRICS, markdown, render_last_best, render_paired, tex_escape
from analysis.paired import PAIRED_HEAD, method_order, paired, verdicts
from analysis.select import Selection, describe, fmt, select, varying_within

# MLflow refuses "@" in metric names, so the project logs mean@32 as mean_at_32; both forms are read.
EVAL_KEY = re.compile(r"^eval/(?P<bench>[^/]+)/(?P<stat>[a-z_]+?)(?:@|_at_)(?P<k>\d+)$")
PAPER_CSV = Path(__file__).with_name("paper_numbers.csv")


def eval_keys(sweep: Sweep, stat: str = "mean") -> dict[str, dict[int, str]]:
    """{bench: {k: logged key}} for eval/<bench>/<stat>@<k> (or <stat>_at_<k>), benches in paper order."""
    found: dict[str, dict[int, str]] = {}
    for key in sweep.keys():
        m = EVAL_KEY.match(key)
        if m and m["stat"] == stat:
            found.setdefault(m["bench"], {})[int(m["k"])] = key
    order = sorted(found, key=lambda b: (style.BENCH_ORDER.index(b) if b in style.BENCH_ORDER else 99, b))
    return {b: dict(sorted(found[b].items())) for b in order}


def eval_benchmarks(sweep: Sweep, stat: str = "mean") -> dict[str, list[int]]:
    return {b: list(ks) for b, ks in eval_keys(sweep, stat).items()}


def eval_key(sweep: Sweep, bench: str, stat: str, k: int) -> str:
    return eval_keys(sweep, stat).get(bench, {}).get(k, f"eval/{bench}/{stat}@{k}")


def choose(sweep: Sweep, benches: list[str] | None, k: int | None, stat: str = "mean") -> tuple[list[str], int]:
    """The benchmarks to show and the k: the largest k logged for all of them, unless given."""
    have = eval_benchmarks(sweep, stat)
    if not have:
        raise ValueError(f"no eval/<bench>/{stat}@<k> metric in experiment {sweep.experiment!r}; "
                         f"logged keys: {', '.join(sweep.keys()[:20]) or 'none'}")
    benches = list(benches or have)
    missing = [b for b in benches if b not in have]
    if missing:
        raise ValueError(f"benchmarks {missing} have no eval/<bench>/{stat}@<k> metric; available: {list(have)}")
    common = set.intersection(*(set(have[b]) for b in benches))
    if k is None:
        if not common:
            raise ValueError(f"no k is logged for all of {benches}: {have}; pass --k and --benchmarks")
        k = max(common)
    elif k not in common:
        raise ValueError(f"{stat}@{k} is not logged for all of {benches} (logged: {have}); pass another --k")
    return benches, k


def method_labels(runs: pd.DataFrame, group_by: tuple[str, ...] = ("algo",)) -> pd.Series:
    """A method name per run: the algorithm's paper label, plus 'name=value' for the other group columns.

    When ``algo`` is a group column, runs of one algorithm that differ in an ``algo.*`` param (an ablation
    in the same sweep) are split by those params, never averaged together (analysis.select.varying_within),
    and named by where they differ from that param's most common value among the algorithm's runs (the
    ablation's usual setting keeps the plain name; with no single most common value every run shows it):
    e.g. ``RPG-REINFORCE-URKL [kl_coef=0]``.
    """
    for col in group_by:
        if col not in runs:
            raise ValueError(f"cannot group by {col!r}: not a run tag or param (have: {', '.join(runs.columns)})")
    first = runs[group_by[0]].astype(str)
    names = first.map(style.label) if group_by[0] == "algo" else first
    extra = {i: [] for i in runs.index}
    for col in group_by[1:]:
        for i, v in runs[col].items():
            extra[i].append(f"{col.split('.')[-1]}={fmt(v)}")
    if "algo" in group_by and "algo" in runs:
        for _, idx in runs.groupby(runs["algo"].astype(str)).groups.items():
            varied = [c for c in varying_within(runs.loc[idx]) if c not in group_by]
            usual = {c: usual_value(runs.loc[idx, c]) for c in varied}
            for i in idx:
                extra[i] += [f"{c.split('.', 1)[1]}={fmt(runs.at[i, c])}" for c in varied
                             if str(runs.at[i, c]) != usual[c]]
    return pd.Series([n + (f" [{', '.join(extra[i])}]" if extra[i] else "") for i, n in zip(runs.index, names)],
                     index=runs.index)


def usual_value(values: pd.Series) -> str | None:
    """The most common value (as text) of ``values``; None if several are equally common (no usual one)."""
    counts = values.astype(str).value_counts()
    top = counts[counts == counts.max()]
    return top.index[0] if len(top) == 1 else None


def run_scores(sweep: Sweep, runs: pd.DataFrame, benches: list[str], k: int, stat: str = "mean",
               group_by=("algo",), last_step: int | None = None, best_from_step: int = 1) -> pd.DataFrame:
    """One row per (run, benchmark) of ``runs``: method, algo, seed, run_id, benchmark, last, best,
    final_step, n_evals. Best is the max over evaluated steps >= ``best_from_step`` (1: the base model's
    step-0 score is not a result of training)."""
    meta = pd.DataFrame({"run_id": runs["run_id"], "method": method_labels(runs, group_by),
                         "algo": runs.get("algo", pd.Series("?", index=runs.index)).astype(str),
                         "seed": runs.get("seed", pd.Series(np.nan, index=runs.index))})
    out = []
    for bench in benches:
        h = sweep.history(eval_key(sweep, bench, stat, k))
        h = h[h["run_id"].isin(meta["run_id"])].astype({"run_id": str})
        if last_step is not None:
            h = h[h["step"] <= last_step]
        h = h.sort_values(["run_id", "step"])
        g = h.groupby("run_id", sort=False)
        trained = h[h["step"] >= best_from_step].groupby("run_id", sort=False)
        per = pd.DataFrame({"last": g["value"].last(), "best": trained["value"].max(), "final_step": g["step"].max(),
                            "n_evals": g["value"].count()})
        if last_step is not None:  # Last is the value AT last_step; runs that never logged it have none
            per.loc[per["final_step"] != last_step, "last"] = np.nan
        per = meta.merge(per, left_on="run_id", right_index=True, how="left")
        out.append(per.assign(benchmark=bench))
    return pd.concat(out, ignore_index=True)


def last_best(scores: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Tidy summary: method, algo, benchmark, metric, mean, std, n, seeds, final_step_min/max, rank."""
    long = scores.melt(id_vars=["method", "algo", "seed", "run_id", "benchmark", "final_step"],
                       value_vars=list(METRICS), var_name="metric", value_name="value").dropna(subset=["value"])
    g = long.groupby(["method", "algo", "benchmark", "metric"], sort=False)
    summary = g["value"].agg(mean="mean", std="std", n="count").reset_index()
    summary["seeds"] = g["seed"].agg(lambda s: " ".join(str(x) for x in sorted(s.dropna().tolist()))).to_numpy()
    summary["final_step_min"] = g["final_step"].min().to_numpy()
    summary["final_step_max"] = g["final_step"].max().to_numpy()
    summary["rank"] = 0
    for _, idx in summary.groupby(["benchmark", "metric"]).groups.items():
        shown = summary.loc[idx, "mean"].round(digits)
        distinct = sorted(shown.unique(), reverse=True)
        summary.loc[idx, "rank"] = shown.map(lambda v: distinct.index(v) + 1).to_numpy()
    morder = {m: i for i, m in enumerate(method_order(scores))}
    border = {b: i for i, b in enumerate(dict.fromkeys(scores["benchmark"]))}
    summary = summary.assign(_m=summary["method"].map(morder), _b=summary["benchmark"].map(border),
                             _x=summary["metric"].map({"last": 0, "best": 1}))
    summary = summary.sort_values(["_m", "_b", "_x"]).drop(columns=["_m", "_b", "_x"]).reset_index(drop=True)
    return summary


def paper_values(table: int, path: Path = PAPER_CSV) -> pd.DataFrame:
    paper = pd.read_csv(path)
    sel = paper[paper["table"] == table]
    if sel.empty:
        raise ValueError(f"no Table {table} in {path}; tables there: {sorted(paper['table'].unique())}")
    return sel


def status_table(sweep: Sweep, selection: Selection) -> pd.DataFrame:
    """Every run with its status, final step (max over all metrics) and whether it was averaged (and why not)."""
    last = sweep.metrics.groupby("run_id", observed=True)["step"].max()
    out = selection.status.copy()
    out["final_step"] = out["run_id"].map(last).astype("Int64")
    out["included"] = out["counted"] == "yes"
    return out.sort_values(["included", "run_name"]).reset_index(drop=True)


def write_tables(sweep: Sweep, out: Path, benches=None, k=None, stat="mean", group_by=("algo",),
                 statuses=("FINISHED",), last_step=None, baseline: str | list[str] | None = "grpo",
                 paper_table: int | None = None,
                 which=("table", "paired", "status"), where: dict | None = None,
                 best_from_step: int = 1) -> list[Path]:
    """Write tables/{last_best,paired_vs_<baseline>,status}.{md,csv,tex} under ``out`` (one paired file per
    baseline: a name or a list of names); returns the paths.

    Runs are chosen by :func:`analysis.select.select`: settings that vary across them (other than the
    method's own) split them into one table per combination of values, each headed by its values."""
    out = Path(out) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    selection = select(sweep.runs, statuses, group_by, where)
    status = status_table(sweep, selection)
    left = status[~status["included"]]
    scope = _scope(selection)
    if "status" in which:
        status.to_csv(out / "status.csv", index=False)
        written.append(out / "status.csv")
        note = (f"**Warning:** {len(left)} run(s) were not averaged (see `counted`).\n\n"
                if len(left) else "Every run is averaged.\n\n")
        put("status.md", "# Run status\n\n" + note + markdown(status) + "\n")
    if not {"table", "paired"} & set(which):
        return written
    benches, k = choose(sweep, benches, k, stat)
    if len(left):
        warnings.warn(f"{len(left)} run(s) not averaged: " + ", ".join(
            f"{r.run_name} ({r.counted[4:]})" for r in left.itertuples()), stacklevel=2)
    warn = (f"\n\n**Warning:** {len(left)} run(s) not averaged, so their methods' rows hold the others only: "
            + ", ".join(f"{r.run_name} ({r.counted})" for r in left.itertuples()) + "; see status.md."
            if len(left) else "")
    groups = selection.groups()
    baselines = ([baseline] if isinstance(baseline, str) else list(baseline or [])) if "paired" in which else []
    parts = {"md": [], "tex": []} | {(b, f): [] for b in baselines for f in ("md", "tex")}
    csv_rows, diff_rows = [], {b: [] for b in baselines}
    for values, runs in groups:
        head = f"## {describe(values)}\n\n" if values else ""
        scores = run_scores(sweep, runs, benches, k, stat, group_by, last_step, best_from_step)
        if "table" in which:
            summary = last_best(scores)
            paper = paper_values(paper_table) if paper_table is not None else None
            if paper is not None:
                pv = paper.set_index(["algo", "benchmark", "metric"])["value"]
                summary["paper"] = [pv.get((a, b, m), np.nan) for a, b, m in
                                    zip(summary["algo"], summary["benchmark"], summary["metric"])]
            csv_rows.append(summary.assign(**{key: v for key, v in values.items()}))
            caption = _caption(summary, stat, k, last_step, paper_table, best_from_step)
            parts["md"].append(head + render_last_best(summary, "md", paper=paper, caption=caption.replace(
                "BOLD", "**bold**").replace("UNDER", "<u>underlined</u>").replace("UNEVEN", f"**{UNEVEN}**")))
            tex_caption = caption.replace("BOLD", "bold").replace("UNDER", "underlined").replace(
                "UNEVEN", rf"\textbf{{{UNEVEN}}}").replace("±", "$\\pm$")
            parts["tex"].append(render_last_best(summary, "tex", paper=paper, caption=tex_escape(describe(values))
                                                 + (": " if values else "") + tex_caption))
        for base in baselines:
            try:
                diff = paired(scores, base)
            except ValueError as e:
                if len(groups) == 1:
                    raise
                parts[base, "md"].append(f"{head}{e}\n")
                continue
            diff_rows[base].append(diff.assign(**{key: v for key, v in values.items()}))
            parts[base, "md"].append(head + render_paired(diff, "md"))
            parts[base, "tex"].append(render_paired(diff, "tex"))
    if "table" in which:
        pd.concat(csv_rows, ignore_index=True).to_csv(out / "last_best.csv", index=False)
        written.append(out / "last_best.csv")
        put("last_best.md", scope + warn + "\n\n" + "\n".join(parts["md"]))
        put("last_best.tex", "\n".join(parts["tex"]))
    for base in baselines:
        name = f"paired_vs_{re.sub(r'[^A-Za-z0-9_.-]+', '_', base)}"
        if diff_rows[base]:
            pd.concat(diff_rows[base], ignore_index=True).to_csv(out / f"{name}.csv", index=False)
            written.append(out / f"{name}.csv")
        put(f"{name}.md", scope + "\n\n" + PAIRED_HEAD.format(metric=f"{stat}@{k}", base=base) + warn + "\n\n"
            + "\n".join(parts[base, "md"]))
        put(f"{name}.tex", "\n".join(parts[base, "tex"]))
    if any(diff_rows.values()):
        put("verdicts.md", verdicts(pd.concat([d for rows in diff_rows.values() for d in rows], ignore_index=True),
                                    f"{stat}@{k}"))
    return written


UNEVEN = "Runs of a method end at different steps"
def _scope(selection: Selection) -> str:
    """What the tables hold: the filters, what defines a method, what splits the tables."""
    lines = [f"Methods: {', '.join(selection.method_keys)} (runs that differ only in the seed are averaged)."]
    if selection.where:
        lines.append(f"Filters: {describe(selection.where)}.")
    if selection.split_keys:
        lines.append(f"One table per {', '.join(selection.split_keys)} (these settings differ between runs).")
    return "\n".join(lines)


def _caption(summary, stat, k, last_step, paper_table, best_from_step) -> str:
    steps = f"at step {last_step}" if last_step is not None else "at each run's final step"
    best = "over evaluated steps" + (f" >= {best_from_step} (not the base model)" if best_from_step > 0 else "")
    uneven = summary[summary["final_step_min"] != summary["final_step_max"]]
    return (f"{stat}@{k}: Last = value {steps}, Best = max {best}; mean ± std (ddof=1) over n "
            f"runs (seeds); best BOLD, second UNDER."
            + (" UNEVEN: see final_step_min/max in last_best.csv."
               if len(uneven) else "")
            + (f" Paper rows: Table {paper_table} of the paper." if paper_table is not None else ""))
