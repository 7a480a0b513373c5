"""One look for every figure and table: label, colour, marker and line style per algorithm name.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies) plus
two of Paul Tol's muted colours. An RPG divergence keeps its colour in both estimator families: the
fully differentiable variant is drawn solid, the REINFORCE-style one dashed. Labels are the paper's
method names, so tables line up with analysis/paper_numbers.csv.

Print sizes: a figure is saved at exactly the size it is declared with (no tight bounding box), one
column (SINGLE_WIDTH) or the full text width (DOUBLE_WIDTH) of a two-column paper, with every text at
>= MIN_FONT_PT at that size and TrueType (Type 42) fonts in PDF/PS, never Type 3.
"""

from __future__ import annotations

import math
import re
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
    "train/score_mean": "Reward (verifier score)",
    "train/entropy": "Entropy",
    "train/response_length_mean": "Response length (tokens)",
    "train/acc": "Train accuracy",
    "kl/k3": "KL (k3 estimate)",
}
# Run parameters as the paper writes them (mathtext), for legends and labels.
PARAM_SYMBOLS = {"clip_low": r"$\epsilon_{\mathrm{low}}$", "clip_high": r"$\epsilon_{\mathrm{high}}$",
                 "kl_coef": r"$\beta$", "dual_clip_c": r"$c$", "ref_update": "ref"}

SINGLE_WIDTH, DOUBLE_WIDTH = 3.3, 6.9  # inches: one column / full text width of a two-column paper
WIDTHS = {"single": SINGLE_WIDTH, "double": DOUBLE_WIDTH}
MIN_FONT_PT = 7
SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "savefig.bbox": "standard", "savefig.dpi": 300}


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


def width(size: str) -> float:
    """Print width in inches of "single" (one column) or "double" (full text width)."""
    if size not in WIDTHS:
        raise ValueError(f"figure size must be one of {list(WIDTHS)}, not {size!r}")
    return WIDTHS[size]


def apply_rc() -> None:
    """Matplotlib defaults shared by all figures: sizes in points are print sizes (>= MIN_FONT_PT)."""
    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "figure.titlesize": 8,
        "xtick.labelsize": 7, "ytick.labelsize": 7, "mathtext.fontset": "dejavusans", "axes.grid": True,
        "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.linewidth": 0.6, "xtick.major.width": 0.6,
        "ytick.major.width": 0.6, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
        "lines.linewidth": 1.2, "lines.markersize": 3, "legend.frameon": False, "legend.handlelength": 2.6,
        **SAVE_RC,
    })


# ----------------------------------------------------------------------------- text and layout

_MATH = re.compile(r"(\$[^$]*\$)")
_PARAM = re.compile(r"\b(" + "|".join(PARAM_SYMBOLS) + r")\b")


def _outside_math(text: str, fn) -> str:
    return "".join(p if _MATH.fullmatch(p) else fn(p) for p in _MATH.split(text))


def pretty(text: str) -> str:
    """Parameter names as symbols (clip_low -> mathtext epsilon_low); any other underscore outside
    math becomes a space, so no figure shows a literal identifier such as eps_low."""
    text = _outside_math(str(text), lambda p: _PARAM.sub(lambda m: PARAM_SYMBOLS[m[0]], p))
    return _outside_math(text, lambda p: p.replace("_", " "))


def visible_len(token: str) -> int:
    """Rough printed width of a token in characters (a mathtext command counts as one)."""
    math_free = re.sub(r"\\(?!mathrm)[a-zA-Z]+", "x", token).replace("\\mathrm", "")
    return len(re.sub(r"[{}$_^]", "", math_free))


def wrap(text: str, chars: int) -> str:
    """Wrap at spaces outside $...$ into lines of about ``chars``; over-long plain words are cut."""
    tokens = re.findall(r"(?:[^\s$]|\$[^$]*\$)+", text)
    lines, line = [], ""
    for tok in tokens:
        while "$" not in tok and len(tok) > chars:
            if line:
                lines.append(line)
                line = ""
            lines.append(tok[:chars])
            tok = tok[chars:]
        if line and visible_len(line) + 1 + visible_len(tok) > chars:
            lines.append(line)
            line = tok
        else:
            line = f"{line} {tok}" if line else tok
    return "\n".join(lines + ([line] if line else []))


def grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    """(rows, cols) for n panels, as few rows as max_cols allows and columns balanced over them."""
    rows = math.ceil(n / max_cols)
    return rows, math.ceil(n / rows)


def legend_below(fig, handles, labels, max_cols: int = 4):
    """A legend under the axes that never widens the figure: as many columns as fit its width, each
    label wrapped to its column; the figure grows in height (never width) to hold it."""
    renderer = fig.canvas.get_renderer()
    em = 0.6 * plt.rcParams["legend.fontsize"]  # a character, in points (rough; checked below)
    room = fig.bbox.width - 4
    n = len(labels)
    ncols = sorted({math.ceil(n / r) for r in range(math.ceil(n / max_cols), n + 1)}, reverse=True)
    tries = [(c, 1.0) for c in ncols] + [(1, f) for f in (0.8, 0.6, 0.4)]
    for ncol, shrink in tries:
        chars = max(8, int(shrink * (fig.get_figwidth() * 72 / ncol / em - 6)))
        leg = fig.legend(handles, [wrap(lab, chars) for lab in labels], loc="outside lower center", ncol=ncol)
        box = leg.get_window_extent(renderer)
        if box.width <= room or (ncol, shrink) == tries[-1]:
            break
        leg.remove()
    w, h = fig.get_size_inches()
    fig.set_size_inches(w, math.ceil(100 * (h + box.height / fig.dpi + 0.05)) / 100)
    return leg
