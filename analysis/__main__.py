"""Regenerate the paper's tables and figures from an MLflow sweep.

    python -m analysis --experiment <sweep> [--tracking-uri URI] --out analysis/out/
    python -m analysis --experiment <sweep> --only table,dynamics --paper-table 3
    python -m analysis --only loss_shapes --out analysis/out/          # needs no sweep

Outputs (stable names) under --out: tables/{last_best,paired_vs_<baseline>}.{md,csv,tex},
tables/verdicts.md, tables/status.{md,csv}, figures/<name>.{png,pdf}; the metric cache under <out>/.cache/.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

TABLES = ("table", "paired", "status")
SWEEP_FIGURES = ("dynamics", "passk", "ablation_clip", "ablation_kl", "estimator_bias")
ALL = TABLES + SWEEP_FIGURES + ("loss_shapes",)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", help="MLflow experiment = sweep name (e.g. rpg)")
    ap.add_argument("--tracking-uri", help="sqlite:///mlflow.db (default, or $MLFLOW_TRACKING_URI) or http://host:port")
    ap.add_argument("--out", default="analysis/out", help="output folder (default analysis/out)")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(ALL)} (default: all)")
    ap.add_argument("--benchmarks", help="comma-separated, e.g. aime24,aime25,amc23 (default: all logged)")
    ap.add_argument("--k", type=int, help="k of mean@k / pass@k (default: the largest logged for all benchmarks)")
    ap.add_argument("--baseline", default="grpo",
                    help="algo (or method label) of the paired comparison, or several, comma-separated (default grpo)")
    ap.add_argument("--paper-table", type=int, choices=(3, 5, 6, 7, 8), help="show the paper's numbers of this table")
    ap.add_argument("--last-step", type=int, help="Last = value at this step (the paper: 400); Best = max up to it")
    ap.add_argument("--group-by", default="algo", help="comma-separated run columns that define a method (default algo)")
    ap.add_argument("--include-running", action="store_true", help="also average RUNNING runs (they stay in status)")
    ap.add_argument("--smooth", type=float, help="EMA weight in [0, 1) applied per run to curves (default none)")
    ap.add_argument("--formats", default="png,pdf", help="figure formats (default png,pdf)")
    ap.add_argument("--where", action="append", metavar="KEY=VALUE",
                    help="only runs with this setting (repeatable), e.g. --where data.max_response_len=4096")
    ap.add_argument("--best-includes-step0", action="store_true",
                    help="let Best be the base model's step-0 score too (default: trained steps only)")
    ap.add_argument("--cache-dir", help="metric cache folder (default <out>/.cache)")
    ap.add_argument("--no-cache", action="store_true", help="read everything from MLflow, write no cache")
    ap.add_argument("--loss-c", type=float, default=2.0, help="dual-clip c drawn in the loss-shape figures (default 2)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    only = _csv(args.only) or list(ALL)
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        print(f"error: unknown --only {unknown}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 2
    if args.smooth is not None and not 0 <= args.smooth < 1:
        print("error: --smooth must be in [0, 1)", file=sys.stderr)
        return 2
    explicit = args.only is not None
    out = Path(args.out)
    formats = tuple(_csv(args.formats))
    statuses = ("FINISHED", "RUNNING") if args.include_running else ("FINISHED",)
    group_by = tuple(_csv(args.group_by))
    benches = _csv(args.benchmarks)
    written: list[Path] = []
    needs_sweep = [t for t in only if t != "loss_shapes"]
    sweep = None
    if needs_sweep:
        if not args.experiment:
            print("error: --experiment is required (the MLflow experiment = sweep name) for "
                  f"{', '.join(needs_sweep)}", file=sys.stderr)
            return 2
        from analysis.load import load_sweep

        cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else out / ".cache"
        try:
            sweep = load_sweep(args.experiment, args.tracking_uri, cache_dir=cache)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"loaded {len(sweep.runs)} runs, {len(sweep.metrics):,d} metric values from {sweep.tracking_uri}")
    skipped: list[str] = []
    tasks = [t for t in ALL if t in only]
    table_parts = tuple(t for t in tasks if t in TABLES)
    steps = ([("tables", None)] if table_parts else []) + [(t, t) for t in tasks if t not in TABLES]
    for name, fig in tqdm(steps, desc="analysis", unit="item"):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                written += _run(name, fig, sweep, args, out, formats, statuses, group_by, benches, table_parts)
            for w in caught:
                tqdm.write(f"warning: {w.message}")
        except ValueError as e:
            if explicit:
                print(f"error: {name}: {e}", file=sys.stderr)
                return 2
            skipped.append(f"{name}: {e}")
    for s in skipped:
        print(f"skipped {s}")
    for p in written:
        print(f"wrote {p}")
    main_table = out / "tables" / "last_best.md"
    if main_table in written:
        print("\n" + main_table.read_text())
    return 0


def _run(name, fig, sweep, args, out, formats, statuses, group_by, benches, table_parts) -> list[Path]:
    from analysis import figures, tables
    from analysis.select import parse_where

    if name == "tables":
        return tables.write_tables(sweep, out, benches=benches, k=args.k, group_by=group_by, statuses=statuses,
                                   last_step=args.last_step, baseline=_csv(args.baseline), paper_table=args.paper_table,
                                   which=table_parts, where=parse_where(args.where),
                                   best_from_step=0 if args.best_includes_step0 else 1)
    fig_dir = out / "figures"
    if fig == "loss_shapes":
        paths = []
        for fname, f in figures.loss_shapes(dual_clip_c=args.loss_c).items():
            paths += figures.save(f, fig_dir, fname, formats)
        return paths
    kw = dict(benches=benches, k=args.k, statuses=statuses, smooth=args.smooth, where=parse_where(args.where))
    if fig in ("dynamics", "passk"):
        kw["group_by"] = group_by
    return figures.save(figures.FIGURES[fig](sweep, **kw), fig_dir, fig, formats)


if __name__ == "__main__":
    sys.exit(main())
