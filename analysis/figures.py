"""The paper's figures from a loaded sweep (matplotlib, Agg backend; PNG and PDF).

  dynamics      Figures 4-6, 10: 2x3 grid, three eval/<bench>/mean@k panels + reward, entropy, length
  passk         Figure 7: eval/<bench>/pass@k per benchmark
  ablation_clip Figure 8: runs that differ in (algo.clip_low, algo.clip_high), same 2x3 grid
  ablation_kl   Figure 9: runs that differ in (algo.kl_coef, algo.ref_update), same 2x3 grid
  loss_shapes   Figures 2 and 3: per-sample loss and gradient weight vs importance weight w, computed
                by calling the project's losses (rpg.core.losses), for A > 0 and A < 0
One line per method = mean over its runs (seeds) at each step, band = +- one std (where n >= 2).
Optional EMA smoothing (per run, before averaging) is stated in the figure title.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from analysis.load import Sweep
from analysis.style import plt
from analysis.tables import choose, eval_benchmarks, eval_key, method_labels

TRAIN_PANELS = [("train/score_mean", "Reward (critic score)", "score"),
                ("train/entropy", "Entropy", "entropy (nats/token)"),
                ("train/response_length_mean", "Response length", "tokens")]


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


def _draw(ax, data: dict[str, pd.DataFrame], styles: dict[str, style.Style], counts: dict[str, int]) -> None:
    for name, d in data.items():
        st = styles[name]
        every = max(1, len(d) // 8)
        ax.plot(d["step"], d["mean"], color=st.color, ls=st.linestyle, marker=st.marker, markersize=4,
                markevery=every, label=f"{name} (n={counts[name]})")
        band = d["n"] >= 2
        ax.fill_between(d["step"], d["mean"] - d["std"], d["mean"] + d["std"], where=band.to_numpy(),
                        color=st.color, alpha=0.18, linewidth=0, interpolate=True)


def grid(sweep: Sweep, panels: list[tuple[str, str, str]], groups: dict[str, list[str]],
         styles: dict[str, style.Style], title: str, ncols: int = 3, smooth: float | None = None):
    """A grid of metric panels, one line per group, legend below the panels."""
    style.apply_rc()
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows + 0.9), layout="constrained", squeeze=False)
    counts = {g: len(ids) for g, ids in groups.items()}
    for ax, (key, panel_title, ylabel) in zip(axes.flat, panels):
        data = curves(sweep, key, groups, smooth)
        ax.set_title(panel_title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        if data:
            _draw(ax, data, styles, counts)
        else:
            ax.text(0.5, 0.5, f"{key}\nnot logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        ncol = len(labels) if len(labels) <= 4 else math.ceil(len(labels) / math.ceil(len(labels) / 4))
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)
    note = f"; EMA smoothing {smooth:g} per run" if smooth else ""
    fig.suptitle(f"{title}\nline = mean over runs (seeds), band = ± 1 std{note}", fontsize=10)
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


def _finished(sweep: Sweep, statuses) -> pd.DataFrame:
    return sweep.runs[sweep.runs["status"].isin(statuses)]


def dynamics(sweep: Sweep, benches=None, k=None, group_by=("algo",), statuses=("FINISHED",), smooth=None):
    runs = _finished(sweep, statuses)
    groups, styles = _method_groups(runs, group_by)
    panels = _eval_panels(sweep, benches, k, "mean") + TRAIN_PANELS
    return grid(sweep, panels, groups, styles, f"{sweep.experiment}: training dynamics", smooth=smooth)


def passk(sweep: Sweep, benches=None, k=None, group_by=("algo",), statuses=("FINISHED",), smooth=None):
    runs = _finished(sweep, statuses)
    groups, styles = _method_groups(runs, group_by)
    panels = _eval_panels(sweep, benches, k, "pass")
    return grid(sweep, panels, groups, styles, f"{sweep.experiment}: pass@k", ncols=len(panels), smooth=smooth)


def ablation(sweep: Sweep, columns: tuple[str, ...], names: tuple[str, ...], what: str, benches=None, k=None,
             statuses=("FINISHED",), smooth=None):
    """Runs of algorithms that were run with more than one setting of ``columns``; one line per setting."""
    runs = _finished(sweep, statuses)
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
    label = runs["algo"].astype(str).map(style.label) + "  " + runs[list(columns)].apply(
        lambda r: ", ".join(f"{n}={v:g}" if isinstance(v, (int, float)) else f"{n}={v}" for n, v in zip(names, r)), axis=1)
    order = sorted(dict.fromkeys(zip(label, runs["algo"])), key=lambda p: (style.order_key(p[1]), p[0]))
    groups = {lab: runs.loc[label == lab, "run_id"].astype(str).tolist() for lab, _ in order}
    styles = dict(zip(groups, style.variant_styles(len(groups))))
    panels = _eval_panels(sweep, benches, k, "mean") + TRAIN_PANELS
    return grid(sweep, panels, groups, styles, f"{sweep.experiment}: {what} ablation", smooth=smooth)


def clip_ablation(sweep: Sweep, **kw):
    return ablation(sweep, ("algo.clip_low", "algo.clip_high"), ("ε_low", "ε_high"), "clip-ratio", **kw)


def kl_ablation(sweep: Sweep, **kw):
    return ablation(sweep, ("algo.kl_coef", "algo.ref_update"), ("β", "ref"), "KL coefficient / reference", **kw)


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
                w_max: float = 2.6) -> dict[str, object]:
    """{"loss_shape_fully_differentiable": Figure 2, "loss_shape_reinforce": Figure 3}."""
    from rpg.core.losses import LossParams

    style.apply_rc()
    params = LossParams(kl_coef=kl_coef, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c,
                        level="sequence", agg="seq-mean")
    ws = np.linspace(0.3, w_max, 181)
    figs = {}
    for fname, loss_name, what in (("loss_shape_fully_differentiable", "rpg_ufkl", "fully differentiable (Figure 2)"),
                                   ("loss_shape_reinforce", "rpg_rf_ufkl", "REINFORCE-style, RPG-Style Clip (Figure 3)")):
        fig, axes = plt.subplots(2, 2, figsize=(9, 5.6), layout="constrained", sharex=True)
        for col, adv in enumerate((1.0, -1.0)):
            loss, weight = loss_curve(loss_name, ws, adv, params)
            flows = np.abs(weight) > 1e-12
            for row, (y, ylab) in enumerate(((loss, "per-sample loss L"), (weight, "gradient weight  −∂L/∂log π(x)"))):
                ax = axes[row, col]
                ax.plot(ws, np.where(flows, y, np.nan), color=style.BLUE, label="gradient flows")
                ax.plot(ws, np.where(flows, np.nan, y), color=style.PURPLE, ls=":", lw=2.2, label="no gradient")
                marks = {1 - clip_low: "1−ε_low", 1 + clip_high: "1+ε_high", dual_clip_c: "c"}
                for x in marks:
                    ax.axvline(x, color="0.55", lw=0.8, ls="--")
                ax.set_ylabel(ylab)
                if row == 0:
                    top = ax.secondary_xaxis("top")
                    top.set_xticks(list(marks), list(marks.values()), fontsize=8)
                    top.tick_params(length=0)
                    ax.set_title(f"A = {adv:+g}", pad=16)
                else:
                    ax.set_xlabel("importance weight w = π_θ(x) / π_old(x)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
        fig.suptitle(f"{loss_name}: {what}; β={kl_coef:g}, ε_low={clip_low:g}, ε_high={clip_high:g}, "
                     f"c={dual_clip_c:g}, log π(x) = −1", fontsize=10)
        figs[fname] = fig
    return figs


def save(fig, out_dir: Path, name: str, formats=("png", "pdf")) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out_dir / f"{name}.{ext}"
        fig.savefig(path)
        paths.append(path)
    plt.close(fig)
    return paths


FIGURES = {"dynamics": dynamics, "passk": passk, "ablation_clip": clip_ablation, "ablation_kl": kl_ablation}


def available_evals(sweep: Sweep) -> dict[str, dict[str, list[int]]]:
    return {stat: eval_benchmarks(sweep, stat) for stat in ("mean", "pass")}
