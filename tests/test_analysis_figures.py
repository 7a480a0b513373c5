"""Every figure of `python -m analysis` rendered from a small real MLflow sweep: files exist, are not
blank, the plotted curves are the seed means/stds, and the loss-shape data come from rpg.core.losses.
Print-readiness: declared column widths kept on save, fonts >= 7 pt, TrueType in PDFs, no empty
panels, mathtext instead of literal underscores, no experiment id in titles, coinciding curves both
visible, and panels that say which runs were left out instead of calling a metric "not logged"."""

from __future__ import annotations

import re

import matplotlib.image
import mlflow
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.text import Text
from mlflow.entities import Metric, Param

from analysis import figures, style
from analysis.__main__ import main
from analysis.figures import curves, loss_curve
from analysis.load import load_sweep
from analysis.style import plt

FIGS = ["dynamics", "passk", "ablation_clip", "ablation_kl", "estimator_bias", "loss_shape_fully_differentiable",
        "loss_shape_reinforce"]


def value(key: str, step: int, seed: int, skill: float) -> float:
    return round(0.2 + skill * step / 30 + 0.01 * seed + 0.001 * len(key), 6)


@pytest.fixture(scope="module")
def sweep_uri(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('figs') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("figs")
    variants = [("grpo", 0.1, (0.2, 0.2), 1e-4, "never"), ("rpg_ufkl", 0.3, (0.2, 0.28), 1e-4, "every_step"),
                ("rpg_rf_ufkl", 0.4, (0.2, 0.28), 1e-4, "every_step"), ("rpg_rf_ufkl", 0.2, (0.1, 0.1), 1e-4, "every_step"),
                ("rpg_rf_ufkl", 0.25, (0.2, 0.28), 1e-3, "every_step"), ("rpg_rf_ufkl", 0.15, (0.2, 0.28), 1e-4, "never")]
    keys = ["train/score_mean", "train/entropy", "train/response_length_mean"]
    for algo, skill, (lo, hi), kl, ref in variants:
        for seed in (1, 2):
            run = client.create_run(exp, run_name=f"{algo}-s{seed}", tags={"algo": algo, "seed": str(seed)}).info.run_id
            ms = [Metric(k, value(k, s, seed, skill), s, s) for k in keys for s in range(31)]
            ms += [Metric(f"eval/{b}/{stat}_at_8", value(b + stat, s, seed, skill), s, s)
                   for b in ("aime24", "aime25", "amc23") for stat in ("mean", "pass") for s in range(0, 31, 10)]
            if algo == "rpg_rf_ufkl" and ref == "never":  # the frozen-reference variant logs the exact KLs
                ms += [Metric(k, value(k, s, seed, skill), s, s) for k, _, _ in figures.EXACT_PANELS for s in range(1, 31)]
            params = {"algo.clip_low": lo, "algo.clip_high": hi, "algo.kl_coef": kl, "algo.ref_update": ref}
            client.log_batch(run, metrics=ms, params=[Param(k, str(v)) for k, v in params.items()])
            client.set_terminated(run, "FINISHED")
    return uri


@pytest.mark.slow  # ~25 s of CPU: six figures, PNG and PDF each
def test_every_figure_renders(sweep_uri, tmp_path):
    assert main(["--experiment", "figs", "--tracking-uri", sweep_uri, "--out", str(tmp_path), "--no-cache",
                 "--only", ",".join(["dynamics", "passk", "ablation_clip", "ablation_kl", "estimator_bias",
                                     "loss_shapes"]),
                 "--smooth", "0.5"]) == 0
    for name in FIGS:
        png, pdf = tmp_path / "figures" / f"{name}.png", tmp_path / "figures" / f"{name}.pdf"
        assert png.stat().st_size > 20_000 and pdf.stat().st_size > 5_000, name
        img = matplotlib.image.imread(png)[..., :3]
        ink = (img.min(axis=-1) < 0.9).mean()  # share of non-white pixels
        colour = (img.max(axis=-1) - img.min(axis=-1) > 0.2).mean()  # share of coloured pixels (lines, bands)
        assert img.shape[0] > 500 and img.shape[1] > 900, name
        assert 0.02 < ink < 0.6 and colour > 0.003, (name, ink, colour)


def test_curves_are_seed_mean_and_std(sweep_uri):
    sweep = load_sweep("figs", sweep_uri, progress=False)
    runs = sweep.runs
    ids = runs.loc[runs["algo"] == "grpo", "run_id"].tolist()
    c = curves(sweep, "train/score_mean", {"GRPO": ids})["GRPO"]
    seeds = [value("train/score_mean", 30, s, 0.1) for s in (1, 2)]
    last = c[c["step"] == 30].iloc[0]
    assert abs(last["mean"] - np.mean(seeds)) <= 1e-12 and abs(last["std"] - np.std(seeds, ddof=1)) <= 1e-12
    assert last["n"] == 2 and len(c) == 31
    smooth = curves(sweep, "train/score_mean", {"GRPO": ids}, smooth=0.5)["GRPO"]
    # EMA with weight 0.5 per run, bias-corrected (pandas adjust=True): step 1 -> (0.5 x0 + x1) / 1.5
    ema1 = [(0.5 * value("train/score_mean", 0, s, 0.1) + value("train/score_mean", 1, s, 0.1)) / 1.5 for s in (1, 2)]
    assert abs(smooth["mean"].iloc[1] - np.mean(ema1)) <= 1e-12


def test_ablation_without_variants_and_bad_benchmark_are_errors(sweep_uri, tmp_path, capsys):
    client = mlflow.MlflowClient(sweep_uri)
    exp = client.create_experiment("flat")
    for seed in (1, 2):
        run = client.create_run(exp, tags={"algo": "grpo", "seed": str(seed)}).info.run_id
        client.log_batch(run, metrics=[Metric("eval/aime24/mean_at_8", 0.1 * seed, 0, 0)],
                         params=[Param("algo.clip_low", "0.2"), Param("algo.clip_high", "0.2")])
        client.set_terminated(run, "FINISHED")
    args = ["--tracking-uri", sweep_uri, "--out", str(tmp_path), "--no-cache"]
    assert main(["--experiment", "flat", "--only", "ablation_clip", *args]) == 2
    assert "more than one (algo.clip_low, algo.clip_high)" in capsys.readouterr().err
    assert main(["--experiment", "figs", "--only", "dynamics", "--benchmarks", "aime24,nope", *args]) == 2
    assert "['nope'] have no eval" in capsys.readouterr().err


def test_loss_shape_data_come_from_the_losses():
    from rpg.core.losses import LossParams

    p = LossParams(kl_coef=0.0, clip_low=0.2, clip_high=0.28, dual_clip_c=2.0, level="sequence", agg="seq-mean")
    ws = np.array([0.5, 1.0, 1.2, 1.5, 2.5])
    for name in ("rpg_ufkl", "rpg_rf_ufkl"):
        loss, weight = loss_curve(name, ws, 1.0, p)
        # A = +1: gradient weight w inside the region (w < 1.28), none above it (Figures 2 and 3)
        np.testing.assert_allclose(weight, [0.5, 1.0, 1.2, 0.0, 0.0], rtol=0, atol=1e-12)
        loss_n, weight_n = loss_curve(name, ws, -1.0, p)
        # A = -1: no gradient below 1 - eps_low = 0.8 and at or above c = 2; weight -w in between
        np.testing.assert_allclose(weight_n, [0.0, -1.0, -1.2, -1.5, 0.0], rtol=0, atol=1e-12)
    fd, _ = loss_curve("rpg_ufkl", ws, 1.0, p)
    np.testing.assert_allclose(fd, [-0.5, -1.0, -1.2, -1.28, -1.28], rtol=0, atol=1e-12)  # max(-w, -clip(w))
    rf, _ = loss_curve("rpg_rf_ufkl", ws, 1.0, p)
    np.testing.assert_allclose(rf, [0.5, 1.0, 1.2, 1.28, 1.28], rtol=0, atol=1e-12)  # w * A * l with l = 1


# ----------------------------------------------------------------------------- print-ready figures

MIXED = "sweep-7f3a"  # a distinctive experiment id: no text of a figure may carry it


@pytest.fixture(scope="module")
def figs(sweep_uri):
    return load_sweep("figs", sweep_uri, progress=False)


@pytest.fixture(scope="module")
def mixed(sweep_uri):
    """Two benchmarks; FINISHED GRPO and RPG-FKL with identical curves, one KILLED and one RUNNING run.
    Entropy is logged only by the two left-out runs, response length by no run."""
    client = mlflow.MlflowClient(sweep_uri)
    exp = client.create_experiment(MIXED)
    for algo, seed, status in [("grpo", 1, "FINISHED"), ("grpo", 2, "FINISHED"), ("rpg_fkl", 1, "FINISHED"),
                               ("rpg_fkl", 2, "FINISHED"), ("dapo", 1, "KILLED"), ("rpg_rkl", 1, "RUNNING")]:
        run = client.create_run(exp, run_name=f"{algo}-s{seed}", tags={"algo": algo, "seed": str(seed)}).info.run_id
        skill = 0.2 if status == "FINISHED" else 0.35
        keys = ["train/score_mean"] + (["train/entropy"] if status != "FINISHED" else [])
        ms = [Metric(k, value(k, s, seed, skill), s, s) for k in keys for s in range(31)]
        ms += [Metric(f"eval/{b}/{stat}_at_8", value(b + stat, s, seed, skill), s, s)
               for b in ("aime24", "aime25") for stat in ("mean", "pass") for s in range(0, 31, 10)]
        client.log_batch(run, metrics=ms)
        if status != "RUNNING":
            client.set_terminated(run, status)
    return load_sweep(MIXED, sweep_uri, progress=False)


LONG = "RPG-REINFORCE-UFKL with a deliberately long method label that keeps going well past any column " \
       "width one might use here."


@pytest.fixture(scope="module")
def rendered(figs, mixed):
    """{name: (figure, declared width in inches, number of panels)}, drawn once."""
    with pytest.warns(UserWarning, match="not drawn"):
        mix = figures.dynamics(mixed)
    ids = figs.runs.loc[figs.runs["algo"] == "grpo", "run_id"].tolist()
    long = figures.grid(figs, figures.TRAIN_PANELS[:2], {LONG: ids, "GRPO": ids},
                        {LONG: style.style("rpg_rf_ufkl"), "GRPO": style.style("grpo")}, size="single")
    out = {"dynamics": (figures.dynamics(figs), 6.9, 6),
           "dynamics_single": (figures.dynamics(figs, size="single"), 3.3, 6),
           "dynamics_one_bench": (figures.dynamics(figs, benches=["aime24"]), 6.9, 4),
           "passk_one_bench": (figures.passk(figs, benches=["aime24"]), 3.3, 1), "passk": (figures.passk(figs), 6.9, 3),
           "ablation_clip": (figures.clip_ablation(figs), 6.9, 6), "ablation_kl": (figures.kl_ablation(figs), 6.9, 6),
           "estimator_bias": (figures.estimator_bias(figs), 6.9, 8),
           "mixed": (mix, 6.9, 6), "long_label": (long, 3.3, 2)}  # two benchmarks: the row is filled
    for name, fig in figures.loss_shapes().items():
        out[name] = (fig, 6.9, 4)
    for fig, _, _ in out.values():
        fig.canvas.draw()
    yield out
    for fig, _, _ in out.values():
        plt.close(fig)


def texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_sizes_are_column_widths_and_fonts_readable_at_print_size(rendered, tmp_path):
    for name, (fig, width, _) in rendered.items():
        assert fig.get_figwidth() == pytest.approx(width) and width <= style.DOUBLE_WIDTH, name
        small = [(t.get_text(), t.get_fontsize()) for t in texts(fig) if t.get_fontsize() < style.MIN_FONT_PT]
        assert not small, (name, small[:3])
    for name, width in (("passk_one_bench", 3.3), ("dynamics", 6.9)):  # the saved file has the declared size
        fig = rendered[name][0]
        w_in, h_in = fig.get_size_inches()
        png, pdf = figures.save(fig, tmp_path, name)
        pixels = np.array(matplotlib.image.imread(png).shape[:2])
        assert np.abs(pixels - [h_in * 300, width * 300]).max() <= 1, (name, pixels)  # not a tight bbox
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)", pdf.read_bytes())
        assert float(box[1]) == pytest.approx(width * 72) and float(box[2]) == pytest.approx(h_in * 72), name


def test_pdf_fonts_are_truetype_not_type3(figs, tmp_path):
    paths = figures.save(figures.passk(figs, benches=["aime24"]), tmp_path, "passk", ("pdf",))
    paths += figures.save(figures.loss_shapes()["loss_shape_reinforce"], tmp_path, "loss", ("pdf",))  # mathtext
    for path in paths:
        pdf = path.read_bytes()
        subtypes = set(re.findall(rb"/Subtype\s*/(\w+)", pdf))
        assert b"Type3" not in subtypes, path
        assert (b"TrueType" in subtypes or b"CIDFontType2" in subtypes) and b"/FontFile2" in pdf, (path, subtypes)


def test_every_visible_panel_has_data_or_says_why(rendered):
    for name, (fig, _, n_panels) in rendered.items():
        shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_subplotspec() is not None]
        assert len(shown) == n_panels, name
        for ax in shown:
            assert ax.lines or ax.collections or ax.patches or ax.texts, (name, ax.get_title())


def test_text_is_mathtext_never_a_literal_identifier(rendered):
    greek = re.compile("[\u0370-\u03ff]")  # a Greek letter belongs in $...$
    for name, (fig, _, _) in rendered.items():
        for t in texts(fig):
            plain = re.sub(r"\$[^$]*\$", "", t.get_text())
            assert "_" not in plain and not greek.search(plain), (name, t.get_text())
            assert "critic" not in plain.lower(), (name, t.get_text())
    wanted = {"ablation_clip": [r"$\epsilon_{\mathrm{low}}$=0.1", r"$\epsilon_{\mathrm{high}}$=0.28"],
              "ablation_kl": [r"$\beta$=0.001"], "estimator_bias": ["ref=never"],
              "loss_shape_reinforce": [r"\pi_\theta(x)", r"$1-\epsilon_{\mathrm{low}}$",
                                       r"$1+\epsilon_{\mathrm{high}}$"]}
    for name, maths in wanted.items():
        shown = " ".join(t.get_text() for t in texts(rendered[name][0]))
        assert all(m in shown for m in maths), (name, maths)
    assert panel(rendered["dynamics"][0], "Reward").get_ylabel() == "verifier score"
    # the algorithms' figure draws each at its usual settings; the variants are the ablation figures'
    legend = " ".join(t.get_text() for t in rendered["dynamics"][0].legends[0].get_texts())
    assert "RPG-REINFORCE-UFKL" in legend and "epsilon" not in legend and "beta" not in legend, legend


def test_long_legend_labels_never_widen_the_figure(rendered, tmp_path):
    fig = rendered["long_label"][0]
    assert len(LONG) == 120 and fig.get_figwidth() == pytest.approx(style.SINGLE_WIDTH)
    legend = fig.legends[0]
    box, page = legend.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, (box, page)
    assert any("\n" in t.get_text() for t in legend.get_texts())  # wrapped, not cut off
    (png,) = figures.save(fig, tmp_path, "long", ("png",))
    assert abs(matplotlib.image.imread(png).shape[1] - style.SINGLE_WIDTH * 300) <= 1


def test_no_title_carries_the_experiment_id(rendered):
    for name, (fig, _, _) in rendered.items():
        assert fig._suptitle is None, name
        carried = [t.get_text() for t in texts(fig) if MIXED in t.get_text() or "figs" in t.get_text()]
        assert not carried, (name, carried)
    assert MIXED in rendered["mixed"][0].rpg_about  # provenance goes to the file's metadata instead


def colour_pixels(fig, ax, hex_colour: str) -> int:
    fig.set_dpi(200)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    b = ax.get_window_extent()
    crop = img[img.shape[0] - int(b.y1):img.shape[0] - int(b.y0), int(b.x0):int(b.x1)]
    rgb = np.array(to_rgb(hex_colour)) * 255
    return int((np.abs(crop - rgb).sum(axis=-1) < 40).sum())


def test_identical_curves_are_both_visible(rendered):
    fig = rendered["mixed"][0]
    ax = panel(fig, "Reward")
    assert len(ax.lines) == 2 and ax.lines[0].get_ydata().tolist() == ax.lines[1].get_ydata().tolist()
    grpo, fkl = colour_pixels(fig, ax, style.ORANGE), colour_pixels(fig, ax, style.BLUE)
    assert min(grpo, fkl) > 0.5 * max(grpo, fkl), (grpo, fkl)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["GRPO (n=2)", "RPG-FKL (n=2)"]
    assert [h.get_linestyle() for h in fig.legends[0].legend_handles] == ["-", "-"]  # legend keeps each own style


def spoken(ax) -> str:
    return " ".join(" ".join(t.get_text().split()) for t in ax.texts)


def test_panels_name_left_out_runs_instead_of_not_logged(rendered, mixed, sweep_uri, tmp_path, capsys):
    fig = rendered["mixed"][0]
    assert len(panel(fig, "AIME24 mean@8").lines) == 2 and not panel(fig, "Reward").texts
    assert spoken(panel(fig, "Entropy")) == \
        "no included run logged Entropy; 2 of 2 run(s) left out by status (KILLED, RUNNING) did"
    assert spoken(panel(fig, "Response length")) == \
        "no included run logged Response length (nor did the 2 run(s) left out by status: KILLED, RUNNING)"
    with pytest.warns(UserWarning, match=r"1 run\(s\) not drawn.*dapo-s1 \(KILLED\)"):
        with_running = figures.dynamics(mixed, statuses=("FINISHED", "RUNNING"))
    entropy = panel(with_running, "Entropy")
    assert len(entropy.lines) == 1 and not entropy.texts  # the RUNNING run's entropy is drawn
    assert "nor did the 1 run(s) left out by status: KILLED" in spoken(panel(with_running, "Response length"))
    plt.close(with_running)
    with pytest.raises(ValueError, match="no run of 'sweep-7f3a' has a status in"):
        figures.dynamics(mixed, statuses=("SCHEDULED",))
    args = ["--experiment", MIXED, "--tracking-uri", sweep_uri, "--out", str(tmp_path), "--no-cache", "--formats", "png"]
    assert main([*args, "--only", "dynamics", "--include-running"]) == 0  # the CLI passes its statuses through
    assert "warning: dynamics: 1 run(s) not drawn, status not in ['FINISHED', 'RUNNING']: dapo-s1 (KILLED)" \
        in capsys.readouterr().out
