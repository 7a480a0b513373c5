"""The same runs under several CPU kernel sets, side by side: what a user on another CPU should expect.

torch picks its CPU kernels (AVX2, AVX-512, ...) from the machine, so last-bit results -- and from them the
sampled responses of an RL run -- differ between machines; ``ATEN_CPU_CAPABILITY`` makes one machine use
another set (``default`` is the scalar set; ``native`` here means the variable unset: the machine's own
choice). This script runs one ``python -m rpg.main -m ...`` command once per kernel set (one process per
set, in parallel, each with its own MLflow store under --out), then prints per run the held-out greedy
accuracy at step 0 and at the last evaluation under every set, and the spread across sets.

    python benchmarks/kernel_sets.py -- seed=1,2,3                       # the README's default-run table
    python benchmarks/kernel_sets.py --sets avx2,avx512,default -- algo=grpo,dapo steps=50
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

METRIC = "eval/toy/greedy_acc"


def kernel_env(kernel_set: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return env if kernel_set == "native" else {**env, "ATEN_CPU_CAPABILITY": kernel_set}


def capability(kernel_set: str) -> str:
    """What torch actually uses when asked for ``kernel_set`` (it never exceeds what the CPU has)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = kernel_env(kernel_set)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def launch(kernel_set: str, overrides: list[str], out: Path) -> subprocess.Popen:
    store = out / f"{kernel_set}.db"
    cmd = [sys.executable, "-m", "rpg.main", "-m", *overrides, f"tracking.uri=sqlite:///{store}",
           f"hydra.sweep.dir={out / kernel_set}"]
    log = open(out / f"{kernel_set}.log", "w")
    return subprocess.Popen(cmd, env=kernel_env(kernel_set), stdout=log, stderr=subprocess.STDOUT)


def accuracies(store: Path) -> dict[str, tuple[float, float, int]]:
    """(step-0 accuracy, last accuracy, last step) per run, keyed by ``algo seed=<n>``."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, METRIC))
            if hist:
                out[f"{run.data.tags.get('algo')} seed={run.data.tags.get('seed')}"] = (hist[0][1], hist[-1][1], hist[-1][0])
    return out


def print_per_algorithm(results: dict, sets: list[str], names: dict) -> None:
    """Mean and range over seeds of the last accuracy, per algorithm and kernel set."""
    algos = sorted({run.split(" seed=")[0] for r in results.values() for run in r})
    print("\nper algorithm, over seeds: mean (min - max) of the last evaluation; gain = mean - step 0\n")
    print(f"| algo | n | {' | '.join(f'{s} ({names[s]})' for s in sets)} |\n|---|---|{'---|' * len(sets)}")
    for algo in algos:
        cells, n = [], 0
        for s in sets:
            runs = [v for k, v in results[s].items() if k.split(" seed=")[0] == algo]
            n = max(n, len(runs))
            last = [v[1] for v in runs]
            gain = 100 * (sum(last) / len(last) - sum(v[0] for v in runs) / len(runs)) if runs else 0.0
            cells.append(f"{sum(last) / len(last):.3f} ({min(last):.3f} - {max(last):.3f}), {gain:+.1f} pts"
                         if runs else "missing")
        print(f"| {algo} | {n} | {' | '.join(cells)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="avx2,native",
                        help="comma-separated ATEN_CPU_CAPABILITY values; native: the machine's own choice")
    parser.add_argument("--out", type=Path, default=Path("outputs/kernel_sets"), help="stores, logs and runs")
    parser.add_argument("overrides", nargs="*", help="rpg.main overrides (after --)")
    args = parser.parse_args()
    sets = args.sets.split(",")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    names = {s: capability(s) for s in sets}
    t0 = time.perf_counter()
    procs = {s: launch(s, args.overrides, args.out) for s in sets}
    failed = [s for s, p in procs.items() if p.wait() != 0]
    minutes = (time.perf_counter() - t0) / 60
    if failed:
        print(f"runs failed under {failed}: see {', '.join(str(args.out / f'{s}.log') for s in failed)}")
        return 1
    results = {s: accuracies(args.out / f"{s}.db") for s in sets}
    header = " | ".join(f"{s} ({names[s]}): step 0 -> last" for s in sets)
    print(f"held-out greedy accuracy ({METRIC}), {len(sets)} kernel sets in {minutes:.1f} min\n")
    print(f"| run | {header} | spread of last |\n|---|{'---|' * len(sets)}---|")
    for run in sorted(set().union(*results.values())):
        cells = [results[s].get(run) for s in sets]
        text = [f"{c[0]:.3f} -> {c[1]:.3f} (step {c[2]})" if c else "missing" for c in cells]
        lasts = [c[1] for c in cells if c]
        print(f"| {run} | {' | '.join(text)} | {max(lasts) - min(lasts):.3f} |")
    print_per_algorithm(results, sets, names)
    print(f"\nstores: {', '.join(str(args.out / f'{s}.db') for s in sets)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
