"""A lean sampler for small models on CPU: the model's own layers, a preallocated KV cache, no framework loop.

``transformers``' ``generate`` spends most of a small model's decode step in per-token bookkeeping (logits
processors, stopping criteria, cache objects, mask building).  This engine calls the model's own modules
(embedding, norms, projections, rotary embedding, MLP, output head) and keeps keys and values in one
preallocated tensor per layer, so a decode step is the arithmetic plus one attention call.

Tokens are drawn from softmax(logits / T), restricted to the top-p nucleus when top_p < 1 (the smallest set
of most likely tokens whose probability reaches top_p, as transformers' TopPLogitsWarper), by inverse CDF with
torch's global generator (one uniform per row).  ``sampler_logp`` holds log softmax(logits / T) of each
sampled token: the quantity the trainer scores as pi_old, so the loop can use it directly (rollout overlap) or
compare it (mismatch metrics); ``sampler_entropy`` the entropy of softmax(logits / T) at each position.

Supported: decoder-only models laid out as Llama/Qwen2/Qwen3 (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
optional ``q_norm``/``k_norm``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``,
``model.model.rotary_emb``), full attention, dense MLPs.  Anything else is refused when the engine is built.
"""

from __future__ import annotations

import torch

from rpg.rollout.base import Generations, InProcessEngine, SamplingParams, decoded_responses, eval_mode, prompt_rows

_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_supported(model) -> None:
    """Raise a ValueError naming what is missing if ``model`` is not laid out as this sampler expects."""
    body = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, n)]
    if not missing:
        layer = body.layers[0]
        missing = [n for n in _LAYER_PARTS if not hasattr(layer, n)]
        missing += [f"self_attn.{n}" for n in _ATTN_PARTS if not missing and not hasattr(layer.self_attn, n)]
    config = getattr(model, "config", None)
    if getattr(config, "use_sliding_window", False) or getattr(config, "num_experts", 0) or \
            getattr(config, "num_local_experts", 0):
        missing.append("full attention and dense MLPs (it has sliding-window attention or experts)")
    if missing:
        raise ValueError(f"engine.rollout=lean supports Llama/Qwen2/Qwen3-style models; "
                         f"{type(model).__name__} lacks {missing}: use engine.rollout=hf")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Decoder:
    """The model's forward, split into prefill and one-token decode steps over a preallocated cache."""

    def __init__(self, model):
        self.model, self.body = model, model.model
        c = model.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim ** -0.5

    def start(self, batch: int, length: int, dtype, device) -> None:
        shape = (batch, self.kv_heads, length, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.body.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.body.layers]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, allowed: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm for ``ids`` [B, T] written at cache slots start..start+T-1;
        ``allowed`` [B, 1, T, start + T] is True where a query may attend to a slot."""
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]
        end = start + ids.shape[1]
        for i, layer in enumerate(self.body.layers):
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, i, start, end, allowed)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.body.norm(x)

    def _attention(self, attn, x, cos, sin, i, start, end, allowed):
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.keys[i][:, :, start:end] = k
        self.values[i][:, :, start:end] = v
        keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        if self.heads != self.kv_heads:  # grouped-query attention: each kv head serves heads / kv_heads queries
            keys = keys.repeat_interleave(self.heads // self.kv_heads, 1)
            values = values.repeat_interleave(self.heads // self.kv_heads, 1)
        # plain attention: on CPU at these sizes torch's fused kernel with a mask costs ~5x more per call
        scores = (q @ keys.transpose(-1, -2)) * self.scale
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float):
    """One token per row from softmax(logits / T) (nucleus top_p), its log-prob under softmax(logits / T) and
    that distribution's entropy.

    logits [B, V] -> tokens [B], logp [B], entropy [B]; temperature 0 is greedy (log-probs at T = 1).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp_all = torch.log_softmax(logits / (temperature or 1.0), -1)
    probs = logp_all.exp()
    entropy = -(probs * logp_all).sum(-1)
    if temperature == 0:
        token = logits.argmax(-1)
        return token, logp_all.gather(-1, token[:, None]).squeeze(-1), entropy
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1)  # ascending, as TopPLogitsWarper
        drop_sorted = sorted_p.cumsum(-1) <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    # inverse-CDF draw: one uniform per row (torch.multinomial draws one per vocabulary entry); a token with
    # probability 0 spans an empty interval of the CDF and cannot be drawn
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1), entropy


class LeanEngine(InProcessEngine):
    def __init__(self, model, tokenizer, batch_size: int = 512):
        check_supported(model)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.decoder = _Decoder(model)

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generations:
        tok = self.tokenizer
        ids, mask = prompt_rows(prompt_token_ids, sampling.n, tok.pad_token_id)
        with eval_mode(self.model):
            parts = [self._sample(ids[s:s + self.batch_size], mask[s:s + self.batch_size], sampling)
                     for s in range(0, ids.shape[0], self.batch_size)]
        seqs, logp, entropy = (torch.cat([p[i] for p in parts]) for i in range(3))
        resp, resp_mask, truncated, texts = decoded_responses(seqs, tok)
        width = resp.shape[1]
        if sampling.temperature == 0:
            return Generations(ids, mask, resp, resp_mask, texts, truncated)
        return Generations(ids, mask, resp, resp_mask, texts, truncated, logp[:, :width] * resp_mask,
                           entropy[:, :width] * resp_mask)

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams):
        """Tokens [b, R] (pad after each row's EOS), their log-probs and the entropies [b, R] for left-padded
        prompts."""
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device).bool()
        b, p, r = ids.shape[0], ids.shape[1], sampling.max_new_tokens
        dtype = next(self.model.parameters()).dtype
        self.decoder.start(b, p + r, dtype, device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        slots = torch.ones(b, p + r, dtype=torch.bool, device=device)
        slots[:, :p] = mask  # a query attends to real prompt tokens and to every generated slot so far
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        allowed = (causal[None] & mask[:, None, :])[:, None]
        # a fully left-padded row of queries would have nothing to attend to (nan): let pads see themselves
        allowed = allowed | torch.eye(p, dtype=torch.bool, device=device)[None, None]
        hidden = self.decoder.forward(ids, positions, 0, allowed)[:, -1]
        next_pos = positions[:, -1] + 1
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        tokens = torch.full((b, r), pad, dtype=torch.long, device=device)
        logps = torch.zeros(b, r, dtype=torch.promote_types(dtype, torch.float32), device=device)
        entropies = torch.zeros_like(logps)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        head = self.model.get_output_embeddings()
        for t in range(r):
            token, logps[:, t], entropies[:, t] = sample_next(head(hidden), sampling.temperature, sampling.top_p)
            tokens[:, t] = torch.where(done, pad, token)
            done = done | (token == eos)
            if t == r - 1 or bool(done.all()):
                break
            step_allowed = slots[:, None, None, : p + t + 1]
            hidden = self.decoder.forward(token[:, None], next_pos[:, None], p + t, step_allowed)[:, -1]
            next_pos = next_pos + 1
        return tokens.cpu(), logps.cpu(), entropies.cpu()
