"""One look for every figure and table: label, colour, marker and line style per algorithm name.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies) plus
two of Paul Tol's muted colours. An RPG divergence keeps its colour in both estimator families: the
fully differentiable variant is drawn solid, the REINFORCE-style one dashed. Labels are the paper's
method names, so tables line up with analysis/paper_numbers.csv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BLUE, VERMILLION, GREEN, PURPLE = "#0072B2", "#D55E00", "#009E73", "#CC79A7"
ORANGE, SKY, BLACK, OLIVE, WINE = "#E69F00", "#56B4E9", "#000000", "#999933", "#882255"
GREY = "#777777"


@dataclass(frozen=True)
class Style:
    label: str
    color: str
    marker: str
    linestyle: str = "-"


# Order = row order of the tables (the paper's: baselines first, then RPG, then RPG-REINFORCE).
STYLES: dict[str, Style] = {
    "reinforce_pp_baseline": Style("REINFORCE++-Baseline", WINE, "P"),
    "reinforce_pp": Style("REINFORCE++", OLIVE, "X"),
    "grpo": Style("GRPO", ORANGE, "o"),
    "grpo_is": Style("GRPO-IS", SKY, "h"),
    "dapo": Style("DAPO", BLACK, "s"),
    "rpg_fkl": Style("RPG-FKL", BLUE, "^"),
    "rpg_rkl": Style("RPG-RKL", VERMILLION, "v"),
    "rpg_ufkl": Style("RPG-UFKL", GREEN, "D"),
    "rpg_urkl": Style("RPG-URKL", PURPLE, "<"),
    "rpg_rf_fkl": Style("RPG-REINFORCE-FKL", BLUE, "^", "--"),
    "rpg_rf_rkl": Style("RPG-REINFORCE-RKL", VERMILLION, "v", "--"),
    "rpg_rf_ufkl": Style("RPG-REINFORCE-UFKL", GREEN, "D", "--"),
    "rpg_rf_urkl": Style("RPG-REINFORCE-URKL", PURPLE, "<", "--"),
}
# For lines that are not one per algorithm (ablation settings, unknown names): distinct, in order.
CYCLE = [BLUE, VERMILLION, GREEN, ORANGE, PURPLE, SKY, BLACK, OLIVE, WINE, GREY]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", ":", "-."]

BENCH_LABELS = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "minerva_math": "Minerva-Math",
                "olympiadbench": "OlympiadBench", "toy": "Toy task"}
BENCH_ORDER = list(BENCH_LABELS)
METRIC_LABELS = {
    "train/score_mean": "Reward (critic score)",
    "train/entropy": "Entropy",
    "train/response_length_mean": "Response length (tokens)",
    "train/acc": "Train accuracy",
    "kl/k3": "KL (k3 estimate)",
}


def style(algo: str, index: int = 0) -> Style:
    """The style of an algorithm name; an unknown name gets the index-th spare colour and its own name."""
    if algo in STYLES:
        return STYLES[algo]
    return Style(str(algo), CYCLE[index % len(CYCLE)], MARKERS[index % len(MARKERS)])


def label(algo: str) -> str:
    return style(algo).label


def bench_label(bench: str) -> str:
    return BENCH_LABELS.get(bench, bench)


def order_key(algo: str) -> tuple[int, str]:
    """Sort key: known algorithms in table order, then unknown names alphabetically."""
    names = list(STYLES)
    return (names.index(algo), "") if algo in names else (len(names), str(algo))


def ordered(algos: Iterable[str]) -> list[str]:
    return sorted(set(algos), key=order_key)


def variant_styles(n: int) -> list[Style]:
    """n distinct styles for lines that are settings, not algorithms (ablations)."""
    return [Style("", CYCLE[i % len(CYCLE)], MARKERS[i % len(MARKERS)], LINESTYLES[(i // len(CYCLE)) % 4])
            for i in range(n)]


def apply_rc() -> None:
    """Matplotlib defaults shared by all figures (readable at column width)."""
    plt.rcParams.update({
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 150,
        "savefig.bbox": "tight", "figure.dpi": 100, "lines.linewidth": 1.6,
    })
