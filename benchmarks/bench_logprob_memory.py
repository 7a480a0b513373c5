"""Peak memory of per-token log-probs (+ entropy) at the Qwen vocabulary: chunked vs full [B, T, V] logits.

The model is a real one-layer Qwen2 (transformers) with the real vocabulary (151,936, untied head) and a
small hidden size, so the vocabulary projection dominates as it does at full size. Each variant runs in a
fresh process; its peak is measured above what the process held once the model and inputs existed
(CPU: peak RSS from getrusage minus the RSS after set-up; CUDA: torch.cuda.max_memory_allocated minus
memory_allocated after set-up). A CPU child gets an address-space limit, so a variant that does not fit
fails its allocation ("refused") instead of waking the kernel's OOM killer.

Variants: ``naive`` (the model's own logits for all positions, then log_softmax) and ``chunk-C``
(rpg.models.logprobs.response_logprobs with C positions per chunk; with gradients on, that function runs each
chunk under torch.utils.checkpoint, so backward recomputes one chunk's logits at a time).
Modes: ``score`` = no grad, log-probs and entropy (old/reference log-probs); ``train`` = log-probs with
grad, then backward (the policy update).

    .venv/bin/python benchmarks/bench_logprob_memory.py                         # CPU, 2K and 8K tokens
    .venv/bin/python benchmarks/bench_logprob_memory.py --tokens 8192 --chunks 1024 --modes train
    python benchmarks/bench_logprob_memory.py --device cuda --dtype bfloat16    # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(spec: dict) -> dict:
    """Run one variant in this (fresh) process; returns its measurements."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(REPO))
    from rpg.models.logprobs import response_logprobs

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    config = Qwen2Config(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=2 * spec["hidden"],
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=spec["tokens"] + 8, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(device, dtype).train()
    prompt = spec["prompt"]
    ids = torch.randint(0, spec["vocab"], (1, spec["tokens"]), device=device)
    mask = torch.ones_like(ids)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        limit = _status_kib("VmSize") * 1024 + int(spec["limit_gib"] * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    train, variant = spec["mode"] == "train", spec["variant"]
    t0 = time.perf_counter()
    try:
        with torch.set_grad_enabled(train):
            if variant == "naive":
                logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt - 1 : -1].float()
                logp_all = F.log_softmax(logits, dim=-1)
                logp = logp_all.gather(-1, ids[:, prompt:, None]).squeeze(-1)
                if not train:
                    entropy = -(logp_all.exp() * logp_all).sum(-1)
            else:
                logp, entropy = response_logprobs(model, ids, mask, prompt, chunk_tokens=int(variant.split("-")[1]),
                                                  with_entropy=not train)
            if train:
                logp.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        ok = True
    except (RuntimeError, MemoryError) as exc:  # allocation refused under the limit
        ok, err = False, str(exc).splitlines()[0][:120]
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {**spec, "ok": ok, "peak_mib": (peak - base) / MIB, "seconds": seconds}
    if not ok:
        out["error"] = err
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--vocab", type=int, default=151936, help="Qwen2.5/Qwen3 vocabulary")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", default="2048,8192", help="sequence lengths (prompt + response), comma-separated")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens; the rest is the response")
    ap.add_argument("--chunks", default="256,1024,4096")
    ap.add_argument("--modes", default="score,train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gib", type=float, default=12.0, help="CPU: address space a child may add")
    ap.add_argument("--json", default=None, help="also write all rows to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    print(f"device {args.device}, {dtype}, vocab {args.vocab}, hidden {args.hidden}, batch 1, prompt {args.prompt}; "
          f"peak memory above the set-up ({'max_memory_allocated' if args.device != 'cpu' else 'peak RSS'})")
    print(f"{'tokens':>6}  {'mode':<5}  {'variant':<16}  {'peak MiB':>9}  {'vs naive':>8}  {'time s':>7}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for mode in args.modes.split(","):
            variants = ["naive"] + [f"chunk-{c}" for c in chunks]
            naive = None
            for variant in variants:
                spec = {"device": args.device, "dtype": dtype, "vocab": args.vocab, "hidden": args.hidden,
                        "tokens": tokens, "prompt": args.prompt, "mode": mode, "variant": variant,
                        "threads": args.threads, "limit_gib": args.limit_gib}
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                if proc.returncode:
                    row = {**spec, "ok": False, "peak_mib": float("nan"), "seconds": float("nan"),
                           "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                if variant == "naive":  # refused: its peak exceeds the limit, so the ratio is below this
                    naive, bound = (row["peak_mib"], "") if row["ok"] else (
                        (args.limit_gib * 1024, "<") if args.device == "cpu" else (None, ""))
                ratio = f"{bound}{row['peak_mib'] / naive:.2f}x" if (naive and row["ok"]) else "-"
                peak = f"{row['peak_mib']:9.0f}" if row["ok"] else (f">{args.limit_gib * 1024:8.0f}"
                                                                   if args.device == "cpu" else "      OOM")
                note = "" if row["ok"] else f"  refused: {row['error']}"
                print(f"{tokens:>6}  {mode:<5}  {variant:<16}  {peak}  {ratio:>8}  {row['seconds']:7.2f}{note}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
