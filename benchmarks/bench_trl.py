"""Speed of rpg's trainer against TRL's GRPOTrainer on the same CPU task: ms per RL step and the ratio.

Both sides train the same warm-started tiny model on the toy addition prompts with the same grader
(rpg.rewards.math), GRPO with rpg's conf/algo/grpo.yaml clip (0.1, 0.1) and beta 1e-4 against a frozen
reference, AdamW at rpg's lr, one optimizer step per batch of prompts x samples responses (on-policy), no
evaluation, one torch thread. Every run is a fresh process; the sides alternate (TRL, rpg, TRL, rpg, ...)
for --reps repetitions per geometry, the first --warmup steps of each run are dropped, and the medians of
the remaining steps are compared.

TRL lives in a venv of its own (created on first use under --trl-venv). The rpg side exports the model
(save_pretrained), the prompts and the hyperparameters to a folder that the TRL side loads with plain
transformers; the TRL side imports only the grader from this repository.

    .venv/bin/python benchmarks/bench_trl.py                              # both geometries, ~5 min
    .venv/bin/python benchmarks/bench_trl.py --geometries 2x8x32 --steps 8 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_SIDE = Path(__file__).resolve().parent / "trl_side.py"
PINS = ["torch==2.13.0", "trl==1.16.0", "transformers==5.19.0"]  # the trl that pip resolves with transformers 5.19.0
ENV_1T = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def rpg_overrides(prompts: int, samples: int, max_len: int, steps: int, out_dir: str, cache: str) -> list[str]:
    batch = prompts * samples
    return [
        "algo=grpo", "data.kl_coef=1e-4",  # grpo.yaml takes beta from the data config (0.1 on the toy)
        f"rollout.prompts_per_step={prompts}", f"rollout.samples_per_prompt={samples}",
        f"data.max_response_len={max_len}", "data.eval_sets=[]",
        f"ppo.mini_batch_size={batch}", f"ppo.micro_batch_size={batch}", "ppo.epochs=1",  # one optimizer step
        f"steps={steps}", "eval_every=0", "save_every=0", "tracking.enabled=false", "engine.torch_threads=1",
        f"out_dir={out_dir}", f"cache_dir={cache}", "resume=never",
    ]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rpg.config import register_configs
    from rpg.main import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def rpg_worker(args) -> None:
    """One rpg run in this process; prints RESULT with perf/step_time_s of every step."""
    import torch

    torch.set_num_threads(1)
    import rpg.train.loop as loop

    times: list[float] = []

    class StepRecorder(loop.NullTracker):  # tracking is off: catch the per-step metrics the loop hands it
        def log_metrics(self, metrics, step):
            if "perf/step_time_s" in metrics:
                times.append(metrics["perf/step_time_s"])
            return super().log_metrics(metrics, step)

    loop.NullTracker = StepRecorder
    with tempfile.TemporaryDirectory(prefix="rpg-bench-") as out:
        cfg = compose(rpg_overrides(args.prompts, args.samples, args.max_len, args.steps, out, args.cache) + args.set)
        loop.run(cfg)
    print("RESULT " + json.dumps({"step_s": times, "threads": torch.get_num_threads(),
                                  "cpu": torch.backends.cpu.get_cpu_capability()}), flush=True)


def export_for_trl(target: Path, cache: str) -> dict:
    """The warm-started model, the training prompts and the shared hyperparameters, as plain files."""
    from omegaconf import OmegaConf

    from rpg.train.build import build_data, build_policy, prompt_texts

    cfg = compose(rpg_overrides(16, 8, 20, 1, str(target / "unused"), cache))
    model, tokenizer, _ = build_policy(cfg)
    train, _ = build_data(cfg)
    model.save_pretrained(target / "model")
    tokenizer.save_pretrained(target / "model")
    a, o = cfg.algo, cfg.optim
    hparams = {"beta": float(a.kl_coef), "clip_low": float(a.clip_low), "clip_high": float(a.clip_high),
               "lr": float(o.lr), "weight_decay": float(o.weight_decay), "betas": list(OmegaConf.to_container(o.betas)),
               "grad_clip": float(o.grad_clip), "temperature": float(cfg.rollout.temperature)}
    spec = {"prompts": prompt_texts(train, tokenizer, cfg.data.chat_template),
            "ground_truths": list(train.ground_truths), "hparams": hparams}
    (target / "prompts.json").write_text(json.dumps(spec))
    return hparams


def ensure_trl_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    probe = "import torch, trl, transformers, datasets"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"creating the TRL venv at {venv} ({', '.join(PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [PINS[0]], check=True)  # torch first, exactly, so trl cannot pull another build
    subprocess.run(pip + PINS, check=True)
    return py


def run_side(cmd: list[str], env: dict) -> dict:
    """One fresh process: its RESULT, plus its wall time and peak RSS (of it and its children)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(stdout[-4000:] + stderr[-8000:])
        raise SystemExit(f"{cmd[1]} failed (exit {proc.returncode})")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def parse_geometry(text: str) -> tuple[int, int, int]:
    p, s, L = (int(x) for x in text.lower().split("x"))
    return p, s, L


SIDES = {"trl": "TRL GRPOTrainer", "rpg": "rpg, on-policy", "rpg+overlap": "rpg, rollout.overlap=true"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometries", default="16x8x20,2x8x32",
                    help="comma-separated PROMPTSxSAMPLESxMAX_RESPONSE_TOKENS (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=8, help="RL steps per run (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="runs per side and geometry, interleaved (default: %(default)s)")
    ap.add_argument("--startup-reps", type=int, default=3,
                    help="one-step runs per side for process time and peak RSS (default: %(default)s; 0: none)")
    ap.add_argument("--trl-venv", type=Path, default=Path("/tmp/rpg-bench-trl-venv"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "rpg-bench-trl-cache"),
                    help="rpg cache_dir (warm start, toy parquet)")
    # internal: one rpg run in this process
    ap.add_argument("--rpg-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rpg_worker:
        return rpg_worker(args)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    import torch
    import transformers

    trl_py = ensure_trl_venv(args.trl_venv)
    env = {**os.environ, **ENV_1T}
    env_trl = {**env, "PYTHONPATH": str(REPO)}  # for rpg.rewards.math (the grader) only
    export = Path(tempfile.mkdtemp(prefix="rpg-bench-trl-export-"))
    hp = export_for_trl(export, args.cache)
    print(f"shared hyperparameters: {hp}", flush=True)

    def commands(p, s, L, steps):
        side_args = ["--prompts", str(p), "--samples", str(s), "--max-len", str(L), "--steps", str(steps)]
        rpg = [sys.executable, str(Path(__file__).resolve()), "--rpg-worker", "--cache", args.cache, *side_args]
        return {"trl": ([str(trl_py), str(TRL_SIDE), "--export", str(export), *side_args], env_trl),
                "rpg": (rpg, env), "rpg+overlap": (rpg + ["--set", "rollout.overlap=true"], env)}

    results = {}
    for geo in args.geometries.split(","):
        p, s, L = parse_geometry(geo)
        runs = {side: [] for side in SIDES}
        for rep in range(args.reps):
            for side, (cmd, e) in commands(p, s, L, args.steps).items():
                r = run_side(cmd, e)
                if len(r["step_s"]) != args.steps:
                    raise SystemExit(f"{side}: {len(r['step_s'])} step times for {args.steps} steps")
                runs[side].append(r)
                kept = r["step_s"][args.warmup:]
                print(f"[{geo} rep {rep + 1}/{args.reps}] {side}: median {1e3 * statistics.median(kept):.0f} ms/step "
                      f"(process {r['wall_s']:.0f} s, {r['threads']} thread, {r['cpu']})", flush=True)
        results[geo] = runs
    startup = {side: [] for side in ("trl", "rpg")}
    for rep in range(args.startup_reps):
        for side in startup:
            cmd, e = commands(16, 8, 20, 1)[side]
            startup[side].append(run_side(cmd, e))
            print(f"[one-step run {rep + 1}/{args.startup_reps}] {side}: {startup[side][-1]['wall_s']:.1f} s, "
                  f"peak RSS {startup[side][-1]['peak_rss_mb']:.0f} MB", flush=True)
    shutil.rmtree(export, ignore_errors=True)

    trl_info = results[next(iter(results))]["trl"][0]
    v = trl_info["versions"]
    print()
    print(f"kernel set: rpg {torch.backends.cpu.get_cpu_capability()}, TRL {trl_info['cpu']}; torch threads: 1 per "
          f"process; {os.cpu_count()} CPUs")
    print(f"rpg side: torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    print(f"TRL side: trl {v['trl']}, torch {v['torch']}, transformers {v['transformers']}, datasets {v['datasets']}")
    print(f"steps per run {args.steps} (first {args.warmup} dropped), {args.reps} interleaved runs per side; "
          "medians over all kept steps, [min-max of per-run medians]; speedup = TRL ms / rpg ms (steps/s ratio)")
    print()
    head = f"{'geometry (P x G, max tokens)':<30}" + "".join(f"{side + ' ms/step':>22}" for side in SIDES) + \
        "".join(f"{'x TRL (' + side + ')':>20}" for side in list(SIDES)[1:])
    print(head)
    print("-" * len(head))
    for geo, runs in results.items():
        cells = {}
        for side in SIDES:
            kept = [t for r in runs[side] for t in r["step_s"][args.warmup:]]
            per_run = [statistics.median(r["step_s"][args.warmup:]) for r in runs[side]]
            cells[side] = (statistics.median(kept), min(per_run), max(per_run))
        p, s, L = parse_geometry(geo)
        fmt = lambda m, lo, hi: f"{1e3 * m:.0f} [{1e3 * lo:.0f}-{1e3 * hi:.0f}]"
        print(f"{f'{p} x {s}, <= {L}':<30}" + "".join(f"{fmt(*cells[side]):>22}" for side in SIDES)
              + "".join(f"{cells['trl'][0] / cells[side][0]:>20.2f}" for side in list(SIDES)[1:]))
    if args.startup_reps:
        print()
        print("one-step run (16 x 8, <= 20 tokens), whole process: median wall s / peak RSS MB")
        med = {side: (statistics.median(r["wall_s"] for r in rs), statistics.median(r["peak_rss_mb"] for r in rs))
               for side, rs in startup.items()}
        for side, (w, m) in med.items():
            print(f"  {side:<5} {w:6.1f} s {m:7.0f} MB")
        print(f"  rpg/TRL: time {med['rpg'][0] / med['trl'][0]:.2f}, peak RSS {med['rpg'][1] / med['trl'][1]:.2f}")


if __name__ == "__main__":
    main()
