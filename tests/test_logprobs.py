"""response_logprobs: the output head is checkpointed exactly when the vocabulary is large; gradients either way
are those of the plain full-logits computation."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rpg.models.logprobs import position_ids_from_mask, response_logprobs


def _model(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return Qwen2ForCausalLM(cfg).double()


@pytest.mark.parametrize("vocab, kept", [(100, True), (1000, False)])  # 4 x hidden = 128
def test_head_logits_are_kept_only_for_a_small_vocabulary(vocab, kept):
    model = _model(vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    mask = torch.ones(3, 5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        logp, entropy = response_logprobs(model, ids, attn, 4, temperature=0.8, chunk_tokens=7, with_entropy=True)
    assert any(s[-1] == vocab for s in saved if len(s) == 2) == kept
    (logp * mask).sum().backward()
    mine = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits[:, 3:-1] / 0.8
    plain = logits.log_softmax(-1)
    plain.gather(-1, ids[:, 4:, None]).squeeze(-1).sum().backward()
    for a, b in zip(mine, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, -(plain.exp() * plain).sum(-1).detach(), rtol=0, atol=1e-12)
