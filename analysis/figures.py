"""The paper's figures from a loaded sweep (matplotlib, Agg backend; PNG and PDF).

  dynamics      Figures 4-6, 10: up to three eval/<bench>/mean@k panels + reward, entropy, length
  passk         Figure 7: eval/<bench>/pass@k per benchmark
  ablation_clip Figure 8: runs that differ in (algo.clip_low, algo.clip_high), panels as dynamics
  ablation_kl   Figure 9: runs that differ in (algo.kl_coef, algo.ref_update), panels as dynamics
  loss_shapes   Figures 2 and 3: per-sample loss and gradient weight vs importance weight w, computed
                by calling the project's losses (rpg.core.losses), for A > 0 and A < 0
One line per method = mean over its runs (seeds) at each step, band = +- one std (where n >= 2),
optional EMA smoothing per run before averaging. Figures carry no title: what a figure shows (sweep,
smoothing, bands) is the paper's caption, and is written into the file's metadata (PDF Subject, PNG
Description). ``size`` = "single" (one column) or "double" (text width); default by panel count.
Only runs whose status is in ``statuses`` are drawn; a panel none of them logged says so, and names
the left-out runs that did.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analysis import style
from analysis.load import Sweep
from analysis.style import plt
from analysis.select import select, varying_within
from analysis.tables import choose, eval_benchmarks, eval_key, method_labels, usual_value

TRAIN_PANELS = [("train/score_mean", "Reward", "verifier score"),
                ("train/entropy", "Entropy", "nats / token"),
                ("train/response_length_mean", "Response length", "tokens")]
SAME = 0.005  # curves closer than this share of the panel's y range are drawn interleaved


def curves(sweep: Sweep, key: str, groups: dict[str, list[str]], smooth: float | None = None) -> dict[str, pd.DataFrame]:
    """{label: DataFrame(step, mean, std, n)} of one metric; groups maps a line label to its run ids."""
    h = sweep.history(key).astype({"run_id": str})
    out = {}
    for name, ids in groups.items():
        sub = h[h["run_id"].isin(ids)]
        if sub.empty:
            continue
        wide = sub.pivot_table(index="step", columns="run_id", values="value", aggfunc="last").sort_index()
        if smooth:
            wide = wide.apply(lambda c: c.dropna().ewm(alpha=1.0 - smooth, adjust=True).mean().reindex(c.index))
        out[name] = pd.DataFrame({"step": wide.index.to_numpy(), "mean": wide.mean(axis=1).to_numpy(),
                                  "std": wide.std(axis=1).to_numpy(), "n": wide.count(axis=1).to_numpy()})
    return out


def _coincident(data: dict[str, pd.DataFrame]) -> dict[str, tuple[int, int]]:
    """{name: (i, k)}: the line is the i-th of k curves that lie on top of each other."""
    values = np.concatenate([d["mean"].to_numpy(float) for d in data.values()])
    span = np.nanmax(values) - np.nanmin(values) if np.isfinite(values).any() else 0.0
    tol = SAME * (span or 1.0)
    clusters: list[list[str]] = []
    for name, d in data.items():
        for c in clusters:
            ref = data[c[0]]
            if np.array_equal(ref["step"], d["step"]) and np.allclose(ref["mean"], d["mean"], rtol=0, atol=tol,
                                                                      equal_nan=True):
                c.append(name)
                break
        else:
            clusters.append([name])
    return {name: (i, len(c)) for c in clusters for i, name in enumerate(c)}


def _draw(ax, data: dict[str, pd.DataFrame], styles: dict[str, style.Style]) -> None:
    """Mean lines with +-1 std bands; k coinciding lines get interleaved dashes (each shows 1/k of
    the length, in its own colour) and staggered markers, so none hides another."""
    place = _coincident(data)
    for name, d in data.items():
        st, (i, k) = styles[name], place[name]
        every = max(1, len(d) // 8)
        ls, marks = st.linestyle, every
        if k > 1:
            ls, step = (3.0 * i, (3.0, 3.0 * (k - 1))), max(every, k)
            marks = (i * step // k, step)
        ax.plot(d["step"], d["mean"], color=st.color, ls=ls, marker=st.marker, markevery=marks)
        band = d["n"] >= 2
        ax.fill_between(d["step"], d["mean"] - d["std"], d["mean"] + d["std"], where=band.to_numpy(),
                        color=st.color, alpha=0.18, linewidth=0, interpolate=True)


def _why_empty(sweep: Sweep, key: str, name: str, left_out: pd.DataFrame) -> str:
    """The truth about a panel without data: no included run logged it; which left-out runs did."""
    text = f"no included run logged {name}"
    if len(left_out):
        have = set(sweep.history(key)["run_id"].astype(str))
        did = left_out[left_out["run_id"].astype(str).isin(have)]
        statuses = ", ".join(sorted(left_out["status"].astype(str).unique()))
        text += (f"; {len(did)} of {len(left_out)} run(s) left out by status ({statuses}) did" if len(did)
                 else f" (nor did the {len(left_out)} run(s) left out by status: {statuses})")
    return text


def grid(sweep: Sweep, panels: list[tuple[str, str, str]], groups: dict[str, list[str]],
         styles: dict[str, style.Style], left_out: pd.DataFrame | None = None, size: str | None = None,
         smooth: float | None = None, about: str = ""):
    """Metric panels, one line per group, legend below; unused grid cells are removed."""
    style.apply_rc()
    size = size or ("single" if len(panels) <= 2 else "double")
    width = style.width(size)
    nrows, ncols = style.grid_shape(len(panels), 2 if size == "single" else 3)
    panel_h = min(0.75 * width / ncols, 2.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, nrows * panel_h), layout="constrained", squeeze=False)
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    left_out = left_out if left_out is not None else sweep.runs.iloc[:0]
    drawn: set[str] = set()
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        data = curves(sweep, key, groups, smooth)
        ax.set_title(style.pretty(title))
        if data:
            ax.set(xlabel="RL step", ylabel=style.pretty(ylabel))
            _draw(ax, data, styles)
            drawn.update(data)
        else:  # a message instead of axes with made-up ticks
            chars = int(ax.get_position().width * width * 72 / (0.6 * plt.rcParams["font.size"]))
            ax.set(xticks=[], yticks=[])
            ax.text(0.5, 0.5, style.wrap(_why_empty(sweep, key, style.pretty(title), left_out), chars),
                    ha="center", va="center", transform=ax.transAxes, color="0.35")
    names = [g for g in groups if g in drawn]
    if names:
        handles = [Line2D([], [], color=styles[g].color, ls=styles[g].linestyle, marker=styles[g].marker)
                   for g in names]
        style.legend_below(fig, handles, [style.pretty(f"{g} (n={len(groups[g])})") for g in names])
    note = f"; EMA smoothing {smooth:g} per run" if smooth else ""
    fig.rpg_about = f"{about}; line = mean over runs (seeds), band = +-1 std{note}"
    return fig


def _groups(runs: pd.DataFrame, labels: pd.Series) -> dict[str, list[str]]:
    return {name: runs.loc[labels == name, "run_id"].astype(str).tolist() for name in dict.fromkeys(labels)}


def _method_groups(runs: pd.DataFrame, group_by=("algo",)) -> tuple[dict[str, list[str]], dict[str, style.Style]]:
    labels = method_labels(runs, group_by)
    algos = runs["algo"].astype(str) if "algo" in runs else labels
    order = sorted(dict.fromkeys(zip(labels, algos)), key=lambda p: (style.order_key(p[1]), p[0]))
    groups = {lab: runs.loc[labels == lab, "run_id"].astype(str).tolist() for lab, _ in order}
    if len({a for _, a in order}) == len(order):  # one line per algorithm: its own style
        styles = {lab: style.style(a, i) for i, (lab, a) in enumerate(order)}
    else:
        styles = dict(zip(groups, style.variant_styles(len(groups))))
    return groups, styles


def _eval_panels(sweep: Sweep, benches, k, stat: str, n: int = 3) -> list[tuple[str, str, str]]:
    benches, k = choose(sweep, benches, k, stat)
    return [(eval_key(sweep, b, stat, k), f"{style.bench_label(b)} {stat}@{k}", "accuracy") for b in benches[:n]]


def _included(sweep: Sweep, statuses, what: str, where=None, group_by=("algo",)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs drawn, runs left out by status), chosen as the tables choose them (analysis.select: --where
    filters, one run per configuration); a warning names the left-out ones. Runs that differ in a setting
    other than the method's are refused: one figure would average them."""
    runs = sweep.runs
    if not runs["status"].isin(statuses).any():
        raise ValueError(f"no run of {sweep.experiment!r} has a status in {list(statuses)} "
                         f"(have: {runs['status'].value_counts().to_dict()}); nothing to draw for {what}")
    selection = select(runs, statuses, group_by, where)
    if selection.split_keys:
        values = {k: sorted(selection.runs[k].astype(str).unique()) for k in selection.split_keys}
        raise ValueError(f"{what}: the runs differ in {', '.join(selection.split_keys)} ({values}); one figure "
                         "would average them: pick one with --where KEY=VALUE")
    left = runs[~runs["status"].isin(statuses)]
    if len(left):
        names = ", ".join(f"{r.run_name} ({r.status})" for r in left.itertuples())
        warnings.warn(f"{what}: {len(left)} run(s) not drawn, status not in {list(statuses)}: {names}", stacklevel=3)
    return selection.runs, left


def _about(sweep: Sweep, what: str, statuses) -> str:
    return f"{what} of sweep {sweep.experiment!r}, runs with status {'/'.join(statuses)}"


def dynamics(sweep: Sweep, benches=None, k=None, group_by=("algo",), statuses=("FINISHED",), smooth=None, size=None,
            where=None):
    runs, left = _included(sweep, statuses, "dynamics", where, group_by)
    groups, styles = _method_groups(_usual_settings(runs), group_by)
    panels = _eval_panels(sweep, benches, k, "mean")
    if benches is None and len(panels) < 3:  # one or two benchmarks: fill the row with the first one's other stats
        first, passes = choose(sweep, None, k)[0][0], eval_benchmarks(sweep, "pass")
        extra = [(f"eval/{first}/greedy_acc", f"{style.bench_label(first)} greedy accuracy", "accuracy")]
        if first in passes:
            kp = max(passes[first])
            extra.insert(0, (eval_key(sweep, first, "pass", kp), f"{style.bench_label(first)} pass@{kp}", "accuracy"))
        panels += [p for p in extra if p[0] in sweep.keys()][:3 - len(panels)]
    panels += TRAIN_PANELS
    return grid(sweep, panels, groups, styles, left, size, smooth, _about(sweep, "training dynamics", statuses))


def passk(sweep: Sweep, benches=None, k=None, group_by=("algo",), statuses=("FINISHED",), smooth=None, size=None,
            where=None):
    runs, left = _included(sweep, statuses, "passk", where, group_by)
    groups, styles = _method_groups(_usual_settings(runs), group_by)
    panels = _eval_panels(sweep, benches, k, "pass")
    return grid(sweep, panels, groups, styles, left, size, smooth, _about(sweep, "pass@k", statuses))


def ablation(sweep: Sweep, columns: tuple[str, ...], names: tuple[str, ...], what: str, benches=None, k=None,
             statuses=("FINISHED",), smooth=None, size=None, where=None, optional: tuple[str, ...] = ()):
    """Runs of algorithms that were run with more than one setting of ``columns``; one line per setting.
    Of an algorithm's runs that also vary in other ``algo.*`` settings (another ablation in the same sweep)
    only those at each such setting's most common value are drawn, e.g. the clip ablation keeps the runs
    at the usual beta and reference; lines never average unlike runs."""
    runs, left = _included(sweep, statuses, f"{what} ablation", where)
    names = tuple(n for c, n in zip(columns, names) if c in runs or c not in optional)
    columns = tuple(c for c in columns if c in runs or c not in optional)
    missing = [c for c in ("algo", *columns) if c not in runs]
    if missing:
        raise ValueError(f"{what} ablation needs run columns {missing} (params/tags); none logged in {sweep.experiment!r}")
    setting = runs[list(columns)].astype(str).agg(", ".join, axis=1)
    varied = setting.groupby(runs["algo"]).nunique()
    keep = runs["algo"].isin(varied[varied > 1].index)
    if not keep.any():
        raise ValueError(f"no algorithm in {sweep.experiment!r} was run with more than one ({', '.join(columns)}); "
                         f"nothing to compare for the {what} ablation")
    runs = runs[keep]
    runs = pd.concat([_at_usual_values(g, [c for c in varying_within(g) if c not in columns])
                      for _, g in runs.groupby("algo")])
    others = [c for c in dict.fromkeys(c for _, g in runs.groupby("algo") for c in varying_within(g)) if c not in columns]
    label = runs["algo"].astype(str).map(style.label) + "  " + runs[[*columns, *others]].apply(
        lambda r: ", ".join(f"{n}={v:g}" if isinstance(v, (int, float)) else f"{n}={v}"
                            for n, v in zip([*names, *(c.split(".", 1)[1] for c in others)], r)), axis=1)
    order = sorted(dict.fromkeys(zip(label, runs["algo"])), key=lambda p: (style.order_key(p[1]), p[0]))
    groups = {lab: runs.loc[label == lab, "run_id"].astype(str).tolist() for lab, _ in order}
    styles = dict(zip(groups, style.variant_styles(len(groups))))
    panels = _eval_panels(sweep, benches, k, "mean") + TRAIN_PANELS
    return grid(sweep, panels, groups, styles, left, size, smooth, _about(sweep, f"{what} ablation", statuses))


def _usual_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """Each algorithm's runs at its usual ``algo.*`` settings: an ablation's variants in the same sweep are
    drawn by the ablation figures, not among the algorithms."""
    if "algo" not in runs:
        return runs
    return pd.concat([_at_usual_values(g, varying_within(g)) for _, g in runs.groupby("algo", sort=False)])


def _at_usual_values(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The runs whose value of each of ``columns`` is that column's most common one (all, where no single
    value is the most common)."""
    keep = pd.Series(True, index=runs.index)
    for c in columns:  # each column's usual value among all the runs, not among those left by another
        usual = usual_value(runs[c])
        keep &= True if usual is None else runs[c].astype(str) == usual
    return runs[keep]


def clip_ablation(sweep: Sweep, **kw):
    return ablation(sweep, ("algo.clip_low", "algo.clip_high", "algo.dual_clip_c"), ("clip_low", "clip_high", "dual_c"),
                    "clip-ratio", optional=("algo.dual_clip_c",), **kw)


def kl_ablation(sweep: Sweep, **kw):
    return ablation(sweep, ("algo.kl_coef", "algo.ref_update"), ("kl_coef", "ref_update"), "KL coefficient / reference",
                    **kw)


ESTIMATORS = ("k1", "k2", "k3")
EXACT_PANELS = ([("kl_exact/reverse", "Exact KL(old || ref)", "nats / token"),
                 ("kl_exact/forward", "Exact KL(ref || old)", "nats / token")]
                + [(f"kl_exact/{e}_error_mean", f"{e} minus exact: mean", "nats / token") for e in ESTIMATORS]
                + [(f"kl_exact/{e}_error_std", f"{e} minus exact: std", "nats / token") for e in ESTIMATORS])


def estimator_bias(sweep: Sweep, statuses=("FINISHED",), smooth=None, size=None, where=None, **_):
    """The exact token KLs between the sampling policy and the reference (full vocabulary, on the
    sampled prefixes) and each estimator's error at the sampled tokens, mean and std per RL step, for
    the runs that logged them (``tracking.exact_kl=true``). k1 and k3 are unbiased, so their mean error
    is sampling noise around 0; k2's is its bias."""
    runs, left = _included(sweep, statuses, "estimator bias", where)
    logged = set(sweep.history("kl_exact/reverse")["run_id"].astype(str))
    groups, styles = _method_groups(runs)  # named among all runs: the variant that logged says which it is
    groups = {g: ids for g, ids in groups.items() if set(ids) & logged}
    if not groups:
        raise ValueError(f"no run of {sweep.experiment!r} logged kl_exact/*: run with tracking.exact_kl=true "
                         "(a reference model other than every_step, one process)")
    return grid(sweep, EXACT_PANELS, groups, styles, left, size, smooth,
                _about(sweep, "exact KL and estimator errors", statuses))


# ----------------------------------------------------------------------------- Figures 2 and 3

def loss_curve(name: str, ws: np.ndarray, advantage: float, params) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample loss and gradient weight -dL/dlog pi(x) of one response with log pi(x) = -1
    (so l = -log pi = 1, as in the paper's Figure 3) at each importance weight w (sequence level)."""
    import torch

    from rpg.core.losses import POLICY_LOSSES

    fn = POLICY_LOSSES[name]
    loss, weight = np.empty(len(ws)), np.empty(len(ws))
    for i, w in enumerate(ws):
        logp = torch.full((1, 1), -1.0, dtype=torch.float64, requires_grad=True)
        old = (logp.detach() - math.log(w)).clone()
        out = fn(logp, old, old.clone(), torch.tensor([advantage], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), params)
        out.loss.backward()
        loss[i], weight[i] = float(out.loss.detach()), -float(logp.grad)
    return loss, weight


def loss_shapes(clip_low: float = 0.2, clip_high: float = 0.28, dual_clip_c: float = 2.0, kl_coef: float = 0.0,
                w_max: float = 2.6, size: str = "double") -> dict[str, object]:
    """{"loss_shape_fully_differentiable": Figure 2, "loss_shape_reinforce": Figure 3}."""
    from rpg.core.losses import LossParams

    style.apply_rc()
    params = LossParams(kl_coef=kl_coef, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c,
                        level="sequence", agg="seq-mean")
    ws = np.linspace(0.3, w_max, 181)
    width = style.width(size)
    marks = {1 - clip_low: r"$1-\epsilon_{\mathrm{low}}$", 1 + clip_high: r"$1+\epsilon_{\mathrm{high}}$",
             dual_clip_c: r"$c$"}
    ylabels = ("per-sample loss $L$", "gradient weight\n" r"$-\partial L/\partial\log\pi(x)$")
    figs = {}
    for fname, loss_name, what in (("loss_shape_fully_differentiable", "rpg_ufkl", "fully differentiable (Figure 2)"),
                                   ("loss_shape_reinforce", "rpg_rf_ufkl", "REINFORCE-style, RPG-Style Clip (Figure 3)")):
        fig, axes = plt.subplots(2, 2, figsize=(width, 0.62 * width), layout="constrained", sharex=True)
        for col, adv in enumerate((1.0, -1.0)):
            loss, weight = loss_curve(loss_name, ws, adv, params)
            flows = np.abs(weight) > 1e-12
            for row, y in enumerate((loss, weight)):
                ax = axes[row, col]
                ax.plot(ws, np.where(flows, y, np.nan), color=style.BLUE, label="gradient flows")
                ax.plot(ws, np.where(flows, np.nan, y), color=style.PURPLE, ls=":", lw=1.8, label="no gradient")
                for x in marks:
                    ax.axvline(x, color="0.55", lw=0.6, ls="--")
                ax.set_ylabel(ylabels[row])
                if row == 0:
                    top = ax.secondary_xaxis("top")
                    top.set_xticks(list(marks), list(marks.values()))
                    top.tick_params(length=0)
                    ax.set_title(f"$A = {adv:+g}$")
                else:
                    ax.set_xlabel(r"importance weight $w = \pi_\theta(x)\,/\,\pi_{\mathrm{old}}(x)$")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=2)
        fig.rpg_about = (f"{loss_name}: {what}; beta={kl_coef:g}, eps_low={clip_low:g}, eps_high={clip_high:g}, "
                         f"c={dual_clip_c:g}, log pi(x) = -1")
        figs[fname] = fig
    return figs


def save(fig, out_dir: Path, name: str, formats=("png", "pdf")) -> list[Path]:
    """Write the figure at its declared (print) size, TrueType fonts, what it shows in the metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    about = getattr(fig, "rpg_about", "")
    meta = {"pdf": {"Subject": about}, "png": {"Description": about}}
    paths = []
    with plt.rc_context(style.SAVE_RC):
        for ext in formats:
            path = out_dir / f"{name}.{ext}"
            fig.savefig(path, metadata=meta.get(ext))
            paths.append(path)
    plt.close(fig)
    return paths


FIGURES = {"dynamics": dynamics, "passk": passk, "ablation_clip": clip_ablation, "ablation_kl": kl_ablation,
           "estimator_bias": estimator_bias}


def available_evals(sweep: Sweep) -> dict[str, dict[str, list[int]]]:
    return {stat: eval_benchmarks(sweep, stat) for stat in ("mean", "pass")}
