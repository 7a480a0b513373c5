"""rpg's on-policy RL step against the floor of the model's own operations on the same CPU task.

The floor is a bare loop written here with no framework around it: sample prompts x samples responses, grade
them, one no-grad forward (the frozen reference's log-probs) and one forward/backward/AdamW step on a plain
policy-gradient loss.  Two floors, differing only in the sampler: transformers' ``generate`` and rpg's lean
sampler (rpg/rollout/lean.py).  The rpg side is `rpg.train.loop.run` with bench_trl.py's on-policy settings
(GRPO, beta 1e-4, frozen reference, one optimizer step per batch, no evaluation, no tracking).  Every run is a
fresh process with one torch thread; the sides alternate; medians of the kept steps.

    .venv/bin/python benchmarks/bench_floor.py                         # 16x8 and 2x8, ~2 min
    .venv/bin/python benchmarks/bench_floor.py --geometries 16x8x20 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trl import ENV_1T, compose, parse_geometry, rpg_overrides, run_side  # noqa: E402

SIDES = ("floor (HF generate)", "floor (lean sampler)", "rpg")


def floor_worker(args) -> None:
    """The bare loop in this process; prints RESULT with the wall time of every step."""
    import copy

    import torch

    torch.set_num_threads(1)
    from rpg.models.logprobs import response_logprobs
    from rpg.rewards import get_reward_fn, score_batch
    from rpg.rollout import make_engine
    from rpg.rollout.base import SamplingParams
    from rpg.train.build import build_data, build_policy, encode_prompts, prompt_texts

    with tempfile.TemporaryDirectory() as out:
        cfg = compose(rpg_overrides(args.prompts, args.samples, args.max_len, args.steps, out, args.cache))
    model, tok, _ = build_policy(cfg)
    train, _ = build_data(cfg)
    ref_model = copy.deepcopy(model).eval()
    engine = make_engine(args.sampler, model, tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    reward = get_reward_fn(cfg.data.reward)
    sampling = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.max_len)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        idx = torch.randint(len(train), (args.prompts,), generator=g).tolist()
        prompts = train.select(idx)
        ids, _ = encode_prompts(prompt_texts(prompts, tok, cfg.data.chat_template), tok, cfg.data.max_prompt_len)
        gens = engine.generate(ids, sampling)
        truths = [prompts.ground_truths[i // args.samples] for i in range(len(gens.texts))]
        scores = torch.tensor([r["score"] for r in score_batch(reward, gens.texts, truths, 5.0)])
        adv = (scores.view(args.prompts, -1) - scores.view(args.prompts, -1).mean(-1, keepdim=True)).flatten()
        p, mask = gens.prompt_ids.shape[1], gens.response_mask.float()
        with torch.no_grad():
            response_logprobs(ref_model, gens.input_ids, gens.attention_mask, p)
        logp, _ = response_logprobs(model, gens.input_ids, gens.attention_mask, p)
        loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"step_s": times, "threads": torch.get_num_threads(),
                                  "cpu": torch.backends.cpu.get_cpu_capability()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometries", default="16x8x20,2x8x32", help="PROMPTSxSAMPLESxMAX_TOKENS, comma-separated")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "rpg-bench-trl-cache"))
    ap.add_argument("--floor-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sampler", default="hf", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_worker:
        return floor_worker(args)
    import torch

    env = {**os.environ, **ENV_1T}
    me, trl_bench = str(Path(__file__).resolve()), str(Path(__file__).resolve().parent / "bench_trl.py")
    table = {}
    for geo in args.geometries.split(","):
        p, s, L = parse_geometry(geo)
        side_args = ["--prompts", str(p), "--samples", str(s), "--max-len", str(L), "--steps", str(args.steps),
                     "--cache", args.cache]
        cmds = {SIDES[0]: [sys.executable, me, "--floor-worker", "--sampler", "hf", *side_args],
                SIDES[1]: [sys.executable, me, "--floor-worker", "--sampler", "lean", *side_args],
                SIDES[2]: [sys.executable, trl_bench, "--rpg-worker", *side_args]}
        kept = {side: [] for side in SIDES}
        for rep in range(args.reps):
            for side, cmd in cmds.items():
                r = run_side(cmd, env)
                kept[side] += r["step_s"][args.warmup:]
                print(f"[{geo} rep {rep + 1}/{args.reps}] {side}: median "
                      f"{1e3 * statistics.median(r['step_s'][args.warmup:]):.0f} ms/step", flush=True)
        table[geo] = {side: statistics.median(v) for side, v in kept.items()}
    print()
    print(f"kernel set {torch.backends.cpu.get_cpu_capability()}, one torch thread, {os.cpu_count()} CPUs; "
          f"{args.reps} interleaved runs per side, {args.steps - args.warmup} kept steps each, medians")
    head = f"{'geometry':<18}" + "".join(f"{s + ' ms':>26}" for s in SIDES) + f"{'rpg / HF floor':>16}{'rpg / lean floor':>18}"
    print(head)
    print("-" * len(head))
    for geo, m in table.items():
        print(f"{geo:<18}" + "".join(f"{1e3 * m[s]:>26.0f}" for s in SIDES)
              + f"{m['rpg'] / m[SIDES[0]]:>16.2f}{m['rpg'] / m[SIDES[1]]:>18.2f}")


if __name__ == "__main__":
    main()
