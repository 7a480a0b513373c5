"""engine.rollout=lean: the same tokens as a plain sampling loop, the exact distribution, the trainer's log-probs."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from rpg.models.logprobs import position_ids_from_mask, response_logprobs
from rpg.models.tiny import build_char_tokenizer, build_tiny_model
from rpg.rollout import make_engine
from rpg.rollout.base import SamplingParams, finish_responses, left_pad
from rpg.rollout.lean import sample_next


@torch.no_grad()
def plain_loop(model, prompts, sampling, tok):
    """The reference sampler: a full forward over the whole sequence for every new token, no cache."""
    ids, mask = left_pad(prompts, tok.pad_token_id)
    ids, mask = ids.repeat_interleave(sampling.n, 0), mask.repeat_interleave(sampling.n, 0)
    out = []
    for _ in range(sampling.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        token, _, _ = sample_next(logits, sampling.temperature, sampling.top_p)
        out.append(token)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return finish_responses(torch.stack(out, 1), tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_same_seed_gives_the_plain_loops_tokens(top_p):
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=3, tokenizer=tok).double()  # float64: cached and full forwards agree to 1e-15
    prompts = [tok.encode("12+34="), tok.encode("7+5="), tok.encode("99+1=")]  # different lengths: left padding
    sampling = SamplingParams(n=4, temperature=0.9, top_p=top_p, max_new_tokens=12)
    torch.manual_seed(5)
    lean = make_engine("lean", model, tok).generate(prompts, sampling)
    torch.manual_seed(5)
    ref_ids, ref_mask, ref_truncated = plain_loop(model, prompts, sampling, tok)
    width = lean.response_ids.shape[1]
    assert torch.equal(lean.response_ids, ref_ids[:, :width]) and torch.equal(lean.response_mask, ref_mask[:, :width])
    assert not ref_mask[:, width:].any() and torch.equal(lean.truncated, ref_truncated)
    assert len({tuple(r) for r in lean.response_ids.tolist()}) > 4  # it sampled, not one fixed answer


def _random_lm(kind: str, vocab: int = 99):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_sampler_logprobs_are_the_trainers(kind):
    """sampler_logp / sampler_entropy = what the trainer scores for pi_old (grouped-query attention, Qwen3's q/k norms, Llama)."""
    tok = build_char_tokenizer()
    model = _random_lm(kind)
    prompts = [tok.encode("3+4="), tok.encode("10+20=")]
    torch.manual_seed(1)
    gens = make_engine("lean", model, tok).generate(prompts, SamplingParams(n=8, temperature=0.7, max_new_tokens=10))
    trainer, entropy = response_logprobs(model, gens.input_ids, gens.attention_mask, gens.prompt_ids.shape[1], 0.7,
                                         with_entropy=True)
    m = gens.response_mask.bool()
    assert m.sum() > 40
    assert torch.allclose(gens.sampler_logp[m], trainer[m], atol=1e-4), (gens.sampler_logp[m] - trainer[m]).abs().max()
    assert torch.allclose(gens.sampler_entropy[m], entropy[m], atol=1e-4)
    assert (gens.sampler_logp[~m] == 0).all() and (gens.sampler_entropy[~m] == 0).all()


def test_unsupported_models_are_refused_when_built():
    tok = build_char_tokenizer()
    with pytest.raises(ValueError, match="engine.rollout=hf"):
        make_engine("lean", torch.nn.Linear(2, 2), tok)


def _five_token_setup():
    vocab = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>", padding_side="left")
    model = _random_lm("qwen2", vocab=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # a distribution far from uniform that top_p 0.7 cuts
    return tok, model


@torch.no_grad()
def _exact_response_probs(model, prompt, steps, temperature, top_p):
    """P(response) of every response (cut after EOS, at most ``steps`` tokens), by walking the tree of prefixes."""
    probs = {}

    def walk(prefix, p):
        if len(prefix) == steps or (prefix and prefix[-1] == 1):
            probs[tuple(prefix)] = p
            return
        q = torch.softmax(model(torch.tensor([prompt + prefix])).logits[0, -1].double() / temperature, -1)
        if top_p < 1:  # keep a token if the tokens more likely than it hold less than top_p
            more_likely = torch.stack([q[q > q[i]].sum() for i in range(len(q))])
            q = torch.where(more_likely < top_p, q, torch.zeros_like(q))
            q = q / q.sum()
        for token in range(len(q)):
            if q[token] > 0:
                walk(prefix + [token], p * float(q[token]))

    walk([], 1.0)
    return probs


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_response_distribution_is_exact_on_an_enumerable_model(top_p):
    tok, model = _five_token_setup()
    prompt, steps, n = [2, 3], 3, 40000
    exact = _exact_response_probs(model, prompt, steps, 1.3, top_p)
    assert abs(sum(exact.values()) - 1) < 1e-9
    torch.manual_seed(0)
    gens = make_engine("lean", model, tok).generate([prompt], SamplingParams(n=n, temperature=1.3, top_p=top_p,
                                                                             max_new_tokens=steps))
    counts: dict = {}
    for ids, m in zip(gens.response_ids.tolist(), gens.response_mask.tolist()):
        key = tuple(i for i, keep in zip(ids, m) if keep)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= {k for k, p in exact.items() if p > 0}  # nothing outside the support
    assert sum(p > 0.01 for p in exact.values()) >= 5  # enough outcomes for the test to mean something
    for key, p in exact.items():
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(counts.get(key, 0) / n - p) <= 5 * sd + 1e-4, (key, counts.get(key, 0) / n, p)
