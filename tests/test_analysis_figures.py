"""Every figure of `python -m analysis` rendered from a small real MLflow sweep: files exist, are not
blank, the plotted curves are the seed means/stds, and the loss-shape data come from rpg.core.losses."""

from __future__ import annotations

import matplotlib.image
import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param

from analysis.__main__ import main
from analysis.figures import curves, loss_curve
from analysis.load import load_sweep

FIGS = ["dynamics", "passk", "ablation_clip", "ablation_kl", "loss_shape_fully_differentiable", "loss_shape_reinforce"]


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
            params = {"algo.clip_low": lo, "algo.clip_high": hi, "algo.kl_coef": kl, "algo.ref_update": ref}
            client.log_batch(run, metrics=ms, params=[Param(k, str(v)) for k, v in params.items()])
            client.set_terminated(run, "FINISHED")
    return uri


@pytest.mark.slow  # ~25 s of CPU: six figures, PNG and PDF each
def test_every_figure_renders(sweep_uri, tmp_path):
    assert main(["--experiment", "figs", "--tracking-uri", sweep_uri, "--out", str(tmp_path), "--no-cache",
                 "--only", ",".join(["dynamics", "passk", "ablation_clip", "ablation_kl", "loss_shapes"]),
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
