"""Markdown and LaTeX renderings of the Last/Best and paired tables (analysis.tables builds the frames)."""

from __future__ import annotations

import re

import pandas as pd

from analysis import style

METRICS = ("last", "best")  # the two numbers per benchmark of the paper's tables

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


def tex_escape(s: str) -> str:
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
        row = [method if fmt == "md" else tex_escape(method), n_text]
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
             "Method & $n$ & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{tex_escape(lab)}}}" for lab in labels) + r" \\",
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
        if c["n_pairs"] < 2:
            return f"{c['mean_diff']:+.{digits}f} (n=1: too few seeds)"
        ci = f" [{c['ci_low']:+.{digits}f}, {c['ci_high']:+.{digits}f}]"
        sign = (f"median {c['median_diff']:+.{digits}f} [{c['sign_low']:+.{digits}f}, {c['sign_high']:+.{digits}f}]"
                f" ({100 * c['sign_coverage']:.4g}%)")
        return (f"{c['mean_diff']:+.{digits}f}{ci} p={c['p_signflip']:.2g}; {sign}: {c['verdict']} "
                f"(n={int(c['n_pairs'])})").replace("%", r"\%" if fmt == "tex" else "%")

    rows = [[m if fmt == "md" else tex_escape(m)] + [cell(cells.loc[(m, b, x)]) if (m, b, x) in cells.index else pm
                                                      for b in benches for x in METRICS] for m in methods]
    head = ["Method"] + [f"{style.bench_label(b)} {x.capitalize()}" for b in benches for x in METRICS]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(tex_escape(h) for h in head)
             + r" \\", r"\midrule"] + [" & ".join(r) + r" \\" for r in rows] + [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
