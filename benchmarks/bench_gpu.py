"""Real-size throughput on one CUDA GPU, without downloading weights: rollout, training and weight sync.

A random-initialised model of the published architecture (``arch:`` in conf/model/<name>.yaml) is built
with transformers in bfloat16 on the GPU; only its config.json is written to a temporary folder, from
which vLLM starts with dummy weights and then receives the model's weights through the project's sync.
Measured:

- rollout tokens/s of the project's engine (rpg.rollout.vllm.VLLMEngine) vs plain ``vllm.LLM.generate``
  (in a separate process, same prompts, same sampling settings);
- training tokens/s: forward + backward of rpg.models.logprobs.response_logprobs (gradient checkpointing on);
- weight-sync seconds (VLLMEngine.sync_weights), sleep/wake seconds;
- memory: this process's torch peak and the device's used memory in each phase (vLLM's engine runs in
  its own processes, so only the device-wide number includes it).

    python benchmarks/bench_gpu.py --model qwen3_4b                     # needs CUDA and `pip install -e .[gpu]`
    python benchmarks/bench_gpu.py --model qwen2_5_7b_instruct --prompts 64 --n 8 --max-new-tokens 2048
    python benchmarks/bench_gpu.py --model qwen3_4b --check              # CPU: config and parameter count only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 1 << 30
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(model_name: str, max_len: int | None = None):
    """The transformers config of conf/model/<model_name>.yaml's ``arch`` (bfloat16, no sliding window)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    path = REPO / "conf" / "model" / f"{model_name}.yaml"
    if not path.is_file():
        raise SystemExit(f"no model config {path}; choose one of {sorted(p.stem for p in path.parent.glob('*.yaml'))}")
    node = OmegaConf.load(path).get("arch")
    if not node:
        raise SystemExit(f"{path} has no arch: block; only the pretrained models' configs have one")
    arch = dict(OmegaConf.to_container(node))
    if max_len:
        arch["max_position_embeddings"] = max(arch.get("max_position_embeddings", 0), max_len)
    config = AutoConfig.for_model(**arch, use_sliding_window=False, dtype="bfloat16")
    config.architectures = [CLASSES[arch["model_type"]]]
    return config


def check(model_name: str) -> None:
    """CPU sanity: build the model on the meta device and compare its size with rpg.launch.plan's count."""
    import torch
    from transformers import AutoModelForCausalLM

    from rpg.launch.plan import Arch, param_count

    config = hf_config(model_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    built = sum(p.numel() for p in model.parameters())
    counted = param_count(Arch.from_dict(config.to_dict()))
    print(f"{model_name}: {type(model).__name__}, {built:,} parameters built, {counted:,} by rpg.launch.plan")
    if built != counted:
        raise SystemExit("parameter counts differ")


def prompts_of(args, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab, 100_000), (args.prompts, args.prompt_len), generator=g).tolist()


def standalone(args) -> dict:
    """Plain vLLM on the same prompts and sampling settings (run in its own process)."""
    from vllm import LLM, SamplingParams

    config = hf_config(args.model, args.prompt_len + args.max_new_tokens)
    llm = LLM(model=args.dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.prompt_len + args.max_new_tokens)
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_new_tokens, logprobs=0, detokenize=False,
                            stop_token_ids=[1])
    requests = [{"prompt_token_ids": p} for p in prompts_of(args, config.vocab_size)]
    llm.generate(requests[:2], params, use_tqdm=False)  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": best, "tokens": tokens}


def device_used_gib() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def project(args) -> dict:
    """The project's engine and trainer path in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from rpg.models.logprobs import response_logprobs
    from rpg.models.tiny import build_char_tokenizer
    from rpg.rollout.base import SamplingParams
    from rpg.rollout.vllm import VLLMEngine

    out: dict = {}
    config = hf_config(args.model, max(args.prompt_len + args.max_new_tokens, args.train_len))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tok = build_char_tokenizer()  # ids/eos/pad only: eos = 1, pad = 0; prompts are token ids
    t0 = time.perf_counter()
    engine = VLLMEngine(model, tok, model_path=args.dir, dtype="bfloat16", seed=0, load_format="dummy",
                        gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=True,
                        max_model_len=args.prompt_len + args.max_new_tokens)
    out["engine start + first sync s"] = time.perf_counter() - t0
    try:
        prompts = prompts_of(args, config.vocab_size)
        sp = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
        engine.generate(prompts[:2], sp)  # warm-up
        best, tokens = float("inf"), 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            g = engine.generate(prompts, sp)
            best = min(best, time.perf_counter() - t0)
            tokens = int(g.response_mask.sum())
        out["rollout"] = {"seconds": best, "tokens": tokens}
        out["device used while generating GiB"] = device_used_gib()
        t0 = time.perf_counter()
        engine.sleep()
        out["sleep s"] = time.perf_counter() - t0
        out["device used while asleep GiB"] = device_used_gib()

        model.gradient_checkpointing_enable()
        model.train()
        ids = torch.randint(3, 100_000, (args.train_batch, args.train_len), device="cuda")
        mask = torch.ones_like(ids)
        prompt = min(args.prompt_len, args.train_len // 2)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logp, _ = response_logprobs(model, ids, mask, prompt, chunk_tokens=args.logprob_chunk)
            logp.float().mean().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        out["train"] = {"seconds": min(times[1:]), "tokens": args.train_batch * args.train_len}
        out["train peak allocated GiB"] = torch.cuda.max_memory_allocated() / GIB
        out["device used after training GiB"] = device_used_gib()

        t0 = time.perf_counter()
        engine.sync_weights(model)  # wakes the engine: weights, then KV cache
        out["wake + sync s"] = time.perf_counter() - t0
        syncs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.sync_weights(model)
            syncs.append(time.perf_counter() - t0)
        out["sync s"] = min(syncs)
    finally:
        engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_4b", help="conf/model/<name>.yaml with an arch: block")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=2, help="responses per forward/backward")
    ap.add_argument("--train-len", type=int, default=4096, help="tokens per training row (prompt + response)")
    ap.add_argument("--logprob-chunk", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-standalone", action="store_true", help="only the project's engine")
    ap.add_argument("--check", action="store_true", help="CPU: build the config, compare parameter counts, exit")
    ap.add_argument("--part", choices=["standalone"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check:
        check(args.model)
        return
    if args.part == "standalone":
        print(json.dumps(standalone(args)))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs CUDA (use --check on CPU)")
    with tempfile.TemporaryDirectory(prefix="rpg-bench-") as d:
        hf_config(args.model, max(args.prompt_len + args.max_new_tokens, args.train_len)).save_pretrained(d)
        args.dir = d
        plain = None
        if not args.skip_standalone:  # first, while the GPU is empty
            argv = [sys.executable, __file__, "--part", "standalone", "--dir", d] + sys.argv[1:]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"standalone vLLM failed:\n{proc.stderr[-3000:]}")
            plain = json.loads(proc.stdout.strip().splitlines()[-1])
        res = project(args)
    name = torch.cuda.get_device_name()
    print(f"{args.model} on {name}: {args.prompts} prompts x {args.n} samples, prompt {args.prompt_len}, "
          f"up to {args.max_new_tokens} new tokens; training rows {args.train_batch} x {args.train_len}")
    rows = [("rollout, rpg VLLMEngine", res["rollout"])] + ([("rollout, plain vLLM", plain)] if plain else [])
    rows.append(("train fwd+bwd (response_logprobs)", res["train"]))
    print(f"{'what':<36} {'tokens':>10} {'seconds':>9} {'tokens/s':>10}")
    for label, r in rows:
        print(f"{label:<36} {r['tokens']:>10,} {r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>10,.0f}")
    if plain:
        ratio = (res["rollout"]["tokens"] / res["rollout"]["seconds"]) / (plain["tokens"] / plain["seconds"])
        print(f"{'rpg / plain rollout throughput':<36} {ratio:>31.2f}")
    for key in ("engine start + first sync s", "sleep s", "wake + sync s", "sync s", "train peak allocated GiB",
                "device used while generating GiB", "device used while asleep GiB", "device used after training GiB"):
        print(f"{key:<36} {res[key]:>31.2f}")


if __name__ == "__main__":
    main()
