"""Rollout speed on CPU: HF ``generate`` vs a plain sampling loop over the KV cache.

    python benchmarks/bench_rollout.py [--model-dir DIR] [--prompts 16] [--samples 8]

Both sample at the given temperature from the same left-padded toy prompts; the table reports
the median wall time per call and the share of rows that ended with ``<eos>``. The load average is
printed too: on a shared machine other processes inflate both numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rpg.models.tiny import build_char_tokenizer, build_tiny_model, load_tiny
from rpg.data.toy_task import toy_problems


@torch.no_grad()
def sample_with_cache(model, input_ids, attention_mask, max_new_tokens, temperature, eos_id, pad_id):
    """Ancestral sampling with the model's KV cache; returns ``[B, <=max_new_tokens]`` token ids.

    Positions come from the attention mask, so left padding is handled; rows that emitted
    ``<eos>`` get ``pad_id`` afterwards. Stops early once every row is done.
    """
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True)
    past, logits, nxt_pos = out.past_key_values, out.logits[:, -1], pos[:, -1:] + 1
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    mask, tokens = attention_mask, []
    for _ in range(max_new_tokens):
        tok = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1).squeeze(1)
        tok = tok.masked_fill(done, pad_id)
        tokens.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt_pos,
                    past_key_values=past, use_cache=True)
        past, logits, nxt_pos = out.past_key_values, out.logits[:, -1], nxt_pos + 1
    return torch.stack(tokens, dim=1)


def _time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="saved tiny model (default: a fresh random one)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model_dir:
        model, tok = load_tiny(args.model_dir)
    else:
        tok = build_char_tokenizer()
        model = build_tiny_model(tokenizer=tok)
    prompts = [p for p, _ in toy_problems("test")[: args.prompts] for _ in range(args.samples)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def hf():
        return model.generate(**enc, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                              max_new_tokens=args.max_new_tokens, pad_token_id=pad, eos_token_id=eos)[
            :, enc["input_ids"].shape[1]:]

    def loop():
        return sample_with_cache(model, enc["input_ids"], enc["attention_mask"], args.max_new_tokens,
                                 args.temperature, eos, pad)

    load = open("/proc/loadavg").read().split()[0]
    print(f"batch {len(prompts)} ({args.prompts} prompts x {args.samples}), max_new_tokens "
          f"{args.max_new_tokens}, threads {args.threads}, load average {load}")
    for name, fn in [("hf_generate", hf), ("kv_cache_loop", loop)]:
        sec, toks = _time(fn, args.reps)
        ended = (toks == eos).any(dim=1).float().mean().item()
        print(f"{name:>14}: {1000 * sec:7.1f} ms/call  new tokens {toks.shape[1]}  rows ending in eos {ended:.2f}")


if __name__ == "__main__":
    main()
