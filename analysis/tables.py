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

# MLflow refuses "@" in metric names, so the project logs mean@32 as mean_at_32; both forms are read.
EVAL_KEY = re.compile(r"^eval/(?P<bench>[^/]+)/(?P<stat>[a-z_]+?)(?:@|_at_)(?P<k>\d+)$")
PAPER_CSV = Path(__file__).with_name("paper_numbers.csv")
METRICS = ("last", "best")


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

    With the default group_by=("algo",), runs of one algorithm that differ in an ``algo.*`` param (an
    ablation in the same sweep) are split by those params, never averaged together.
    """
    for col in group_by:
        if col not in runs:
            raise ValueError(f"cannot group by {col!r}: not a run tag or param (have: {', '.join(runs.columns)})")
    first = runs[group_by[0]].astype(str)
    names = first.map(style.label) if group_by[0] == "algo" else first
    extra = {i: [] for i in runs.index}
    for col in group_by[1:]:
        for i, v in runs[col].items():
            extra[i].append(f"{col.split('.')[-1]}={_fmt(v)}")
    if tuple(group_by) == ("algo",):
        hyper = [c for c in runs.columns if c.startswith("algo.") and c != "algo.name"]
        for _, idx in runs.groupby(first).groups.items():
            varied = [c for c in hyper if runs.loc[idx, c].astype(str).nunique() > 1]
            for i in idx:
                extra[i] += [f"{c.split('.', 1)[1]}={_fmt(runs.at[i, c])}" for c in varied]
    return pd.Series([n + (f" [{', '.join(extra[i])}]" if extra[i] else "") for i, n in zip(runs.index, names)],
                     index=runs.index)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def included(sweep: Sweep, statuses=("FINISHED",)) -> pd.DataFrame:
    runs = sweep.runs
    left_out = runs[~runs["status"].isin(statuses)]
    if len(left_out):
        names = ", ".join(f"{r.run_name} ({r.status})" for r in left_out.itertuples())
        warnings.warn(f"{len(left_out)} run(s) not averaged, status not in {list(statuses)}: {names}", stacklevel=2)
    return runs[runs["status"].isin(statuses)]


def run_scores(sweep: Sweep, benches: list[str], k: int, stat: str = "mean", group_by=("algo",),
               statuses=("FINISHED",), last_step: int | None = None) -> pd.DataFrame:
    """One row per (run, benchmark): method, algo, seed, run_id, benchmark, last, best, final_step, n_evals."""
    runs = included(sweep, statuses)
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
        per = pd.DataFrame({"last": g["value"].last(), "best": g["value"].max(), "final_step": g["step"].max(),
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
    morder = {m: i for i, m in enumerate(_method_order(scores))}
    border = {b: i for i, b in enumerate(dict.fromkeys(scores["benchmark"]))}
    summary = summary.assign(_m=summary["method"].map(morder), _b=summary["benchmark"].map(border),
                             _x=summary["metric"].map({"last": 0, "best": 1}))
    summary = summary.sort_values(["_m", "_b", "_x"]).drop(columns=["_m", "_b", "_x"]).reset_index(drop=True)
    return summary


def _method_order(scores: pd.DataFrame) -> list[str]:
    pairs = scores[["method", "algo"]].drop_duplicates()
    return [m for m, _ in sorted(zip(pairs["method"], pairs["algo"]), key=lambda p: (style.order_key(p[1]), p[0]))]


def paper_values(table: int, path: Path = PAPER_CSV) -> pd.DataFrame:
    paper = pd.read_csv(path)
    sel = paper[paper["table"] == table]
    if sel.empty:
        raise ValueError(f"no Table {table} in {path}; tables there: {sorted(paper['table'].unique())}")
    return sel


def paired(scores: pd.DataFrame, baseline: str, n_boot: int = 10_000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each method minus the baseline, matched by seed: mean difference and a percentile bootstrap CI.

    baseline: an algo name or a method label. Runs sharing (method, seed) are averaged first. With n < 2
    pairs the CI is NaN; with few seeds it is coarse (n seeds give at most C(2n-1, n) distinct resamples).
    """
    per = scores.melt(id_vars=["method", "algo", "seed", "benchmark"], value_vars=list(METRICS),
                      var_name="metric", value_name="value").dropna(subset=["value", "seed"])
    per = per.groupby(["method", "algo", "benchmark", "metric", "seed"], as_index=False)["value"].mean()
    base_rows = per[(per["algo"] == baseline) | (per["method"] == baseline)]
    if base_rows.empty:
        raise ValueError(f"baseline {baseline!r} has no finished run; methods: {sorted(per['method'].unique())}")
    base_label = base_rows["method"].iloc[0]
    base = per[per["method"] == base_label].set_index(["benchmark", "metric", "seed"])["value"]
    rng = np.random.default_rng(seed)
    rows = []
    for (method, bench, metric), grp in per[per["method"] != base_label].groupby(["method", "benchmark", "metric"], sort=False):
        keyed = grp.set_index(["benchmark", "metric", "seed"])["value"]
        common = keyed.index.intersection(base.index)
        d = (keyed.loc[common] - base.loc[common]).to_numpy()
        lo = hi = np.nan
        if len(d) >= 2:
            means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
            lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
        rows.append({"method": method, "baseline": base_label, "benchmark": bench, "metric": metric,
                     "mean_diff": d.mean() if len(d) else np.nan, "ci_low": lo, "ci_high": hi, "n_pairs": len(d),
                     "seeds": " ".join(str(s[2]) for s in common)})
    out = pd.DataFrame(rows, columns=["method", "baseline", "benchmark", "metric", "mean_diff", "ci_low",
                                      "ci_high", "n_pairs", "seeds"])
    order = {m: i for i, m in enumerate(_method_order(scores))}
    return out.sort_values("method", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def status_table(sweep: Sweep, statuses=("FINISHED",)) -> pd.DataFrame:
    """All runs with their status, final step (max over all metrics) and whether they were averaged."""
    runs = sweep.runs
    last = sweep.metrics.groupby("run_id", observed=True)["step"].max()
    cols = [c for c in ("run_id", "run_name", "algo", "seed", "status") if c in runs]
    out = runs[cols].copy()
    out["final_step"] = out["run_id"].map(last).astype("Int64")
    out["included"] = out["status"].isin(statuses)
    return out.sort_values(["included", "run_name"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- rendering

def markdown(df: pd.DataFrame) -> str:
    """A plain Markdown table of a DataFrame (no extra dependency)."""
    head = [str(c) for c in df.columns]
    rows = [["" if pd.isna(v) else str(v) for v in r] for r in df.itertuples(index=False)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _cell(mean: float, std: float, n: int, digits: int, fmt: str) -> str:
    if n == 0 or pd.isna(mean):
        return "–"
    sd = "–" if pd.isna(std) else f"{std:.{digits}f}"
    pm = r" $\pm$ " if fmt == "tex" else " ± "
    return f"{mean:.{digits}f}{pm}{sd}"


def _mark(text: str, rank: int, fmt: str) -> str:
    if rank == 1:
        return rf"\textbf{{{text}}}" if fmt == "tex" else f"**{text}**"
    if rank == 2:
        return rf"\underline{{{text}}}" if fmt == "tex" else f"<u>{text}</u>"
    return text


def _tex_escape(s: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", s)


def render_last_best(summary: pd.DataFrame, fmt: str, digits: int = 4, paper: pd.DataFrame | None = None,
                     caption: str = "") -> str:
    """Markdown ('md') or LaTeX ('tex'): one row per method, Last/Best columns per benchmark."""
    benches = list(dict.fromkeys(summary["benchmark"]))
    methods = list(dict.fromkeys(summary["method"]))
    cells = summary.set_index(["method", "benchmark", "metric"])
    pap = paper.set_index(["algo", "benchmark", "metric"])["value"] if paper is not None else None
    rows = []
    for method in methods:
        sub = summary[summary["method"] == method]
        ns = sorted(sub["n"].unique())
        n_text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        row = [method if fmt == "md" else _tex_escape(method), n_text]
        for b in benches:
            for m in METRICS:
                if (method, b, m) in cells.index:
                    c = cells.loc[(method, b, m)]
                    row.append(_mark(_cell(c["mean"], c["std"], int(c["n"]), digits, fmt), int(c["rank"]), fmt))
                else:
                    row.append("–")
        rows.append(row)
        algo = sub["algo"].iloc[0]
        is_last = all(summary.loc[summary["method"] == m2, "algo"].iloc[0] != algo for m2 in methods[methods.index(method) + 1:])
        if pap is not None and is_last and algo in pap.index.get_level_values(0):
            vals = [f"{pap[(algo, b, m)]:.{digits}f}" if (algo, b, m) in pap.index else "–" for b in benches for m in METRICS]
            name = f"↳ paper ({style.label(algo)})" if fmt == "md" else r"\quad\textit{paper}"
            rows.append([name, ""] + ([f"*{v}*" for v in vals] if fmt == "md" else [rf"\textit{{{v}}}" for v in vals]))
    labels = [style.bench_label(b) for b in benches]
    if fmt == "md":
        head = ["Method", "n"] + [f"{lab} {m.capitalize()}" for lab in labels for m in METRICS]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return (f"{caption}\n\n" if caption else "") + "\n".join(lines) + "\n"
    spec = "l" + "r" + "rr" * len(benches)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             "Method & $n$ & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex_escape(lab)}}}" for lab in labels) + r" \\",
             " ".join(rf"\cmidrule(lr){{{3 + 2 * i}-{4 + 2 * i}}}" for i in range(len(benches))),
             " & & " + " & ".join("Last & Best" for _ in benches) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{caption}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render_paired(diff: pd.DataFrame, fmt: str, digits: int = 4) -> str:
    benches = list(dict.fromkeys(diff["benchmark"]))
    methods = list(dict.fromkeys(diff["method"]))
    cells = diff.set_index(["method", "benchmark", "metric"])
    pm = "--" if fmt == "tex" else "–"

    def cell(c) -> str:
        if c["n_pairs"] == 0:
            return "–"
        ci = "" if pd.isna(c["ci_low"]) else f" [{c['ci_low']:+.{digits}f}, {c['ci_high']:+.{digits}f}]"
        return f"{c['mean_diff']:+.{digits}f}{ci} (n={int(c['n_pairs'])})"

    rows = [[m if fmt == "md" else _tex_escape(m)] + [cell(cells.loc[(m, b, x)]) if (m, b, x) in cells.index else pm
                                                      for b in benches for x in METRICS] for m in methods]
    head = ["Method"] + [f"{style.bench_label(b)} {x.capitalize()}" for b in benches for x in METRICS]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(_tex_escape(h) for h in head)
             + r" \\", r"\midrule"] + [" & ".join(r) + r" \\" for r in rows] + [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(sweep: Sweep, out: Path, benches=None, k=None, stat="mean", group_by=("algo",),
                 statuses=("FINISHED",), last_step=None, baseline: str | None = "grpo", paper_table: int | None = None,
                 n_boot: int = 10_000, which=("table", "paired", "status")) -> list[Path]:
    """Write tables/{last_best,paired_vs_<baseline>,status}.{md,csv,tex} under ``out``; returns the paths."""
    out = Path(out) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    status = status_table(sweep, statuses)
    if "status" in which:
        status.to_csv(out / "status.csv", index=False)
        written.append(out / "status.csv")
        left = status[~status["included"]]
        note = (f"**Warning:** {len(left)} run(s) were not averaged (status not in {list(statuses)}).\n\n"
                if len(left) else "All runs have an included status.\n\n")
        put("status.md", "# Run status\n\n" + note + markdown(status) + "\n")
    if not {"table", "paired"} & set(which):
        return written
    benches, k = choose(sweep, benches, k, stat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the status table above already names the left-out runs
        scores = run_scores(sweep, benches, k, stat, group_by, statuses, last_step)
    left = status[~status["included"]]
    if len(left):
        warnings.warn(f"{len(left)} run(s) not averaged (status not in {list(statuses)}): "
                      + ", ".join(f"{r.run_name} ({r.status})" for r in left.itertuples()), stacklevel=2)
    warn = (f"\n\n**Warning:** {len(left)} run(s) not averaged ({', '.join(left['status'].astype(str).unique())}); "
            "see status.md." if len(left) else "")
    if "table" in which:
        summary = last_best(scores)
        paper = paper_values(paper_table) if paper_table is not None else None
        if paper is not None:
            pv = paper.set_index(["algo", "benchmark", "metric"])["value"]
            summary["paper"] = [pv.get((a, b, m), np.nan) for a, b, m in
                                zip(summary["algo"], summary["benchmark"], summary["metric"])]
        summary.to_csv(out / "last_best.csv", index=False)
        written.append(out / "last_best.csv")
        steps = f"at step {last_step}" if last_step is not None else "at each run's final step"
        uneven = summary[summary["final_step_min"] != summary["final_step_max"]]
        base = (f"{stat}@{k}: Last = value {steps}, Best = max over evaluated steps; mean ± std (ddof=1) over n "
                f"runs (seeds); best BOLD, second UNDER."
                + (" Runs of a method end at different steps: see final_step_min/max in last_best.csv."
                   if len(uneven) else "")
                + (f" Paper rows: Table {paper_table} of the paper." if paper_table is not None else ""))
        md_caption = base.replace("BOLD", "**bold**").replace("UNDER", "<u>underlined</u>") + warn
        tex_caption = base.replace("BOLD", "bold").replace("UNDER", "underlined").replace("±", "$\\pm$") + \
            (f" {len(left)} run(s) not averaged (see status.md)." if len(left) else "")
        put("last_best.md", render_last_best(summary, "md", paper=paper, caption=md_caption))
        put("last_best.tex", render_last_best(summary, "tex", paper=paper, caption=tex_caption))
    if "paired" in which and baseline:
        diff = paired(scores, baseline, n_boot=n_boot)
        name = f"paired_vs_{re.sub(r'[^A-Za-z0-9_.-]+', '_', baseline)}"
        diff.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
        head = (f"{stat}@{k}, each method minus {diff['baseline'].iloc[0] if len(diff) else baseline}, matched by seed: "
                f"mean difference [95% percentile bootstrap CI, {n_boot} resamples] (n = seed pairs).{warn}\n\n")
        put(f"{name}.md", head + render_paired(diff, "md"))
        put(f"{name}.tex", render_paired(diff, "tex"))
    return written
