"""Sampling and scoring a training batch: rollout -> reward (+ overlong shaping) -> dynamic sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpg.train.build import encode_prompts, prompt_texts
from rpg.data import PromptSet
from rpg.rewards import score_batch
from rpg.rewards.math import overlong_penalty
from rpg.rollout.base import Generations, SamplingParams, concat_generations


class DynamicSamplingError(RuntimeError):
    pass


@dataclass
class ScoredBatch:
    gens: Generations
    scores: torch.Tensor  # [B] reward used for learning (score + overlong penalty)
    acc: torch.Tensor  # [B] 1.0 if correct
    group_ids: torch.Tensor  # [B]
    stats: dict[str, float]


class PromptSampler:
    """Draws prompt indices without replacement from a seeded stream of permutations; resumable."""

    def __init__(self, size: int, seed: int):
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.seed, self.epoch, self.pos = size, seed, 0, 0
        self.ahead: list[int] = []  # drawn by draw_ahead, returned by the next call of next

    def _perm(self) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))

    def draw_ahead(self, n: int) -> list[int]:
        """The indices the next ``next(n)`` will return, drawn now (they are kept in the state)."""
        self.ahead = self.next(n)
        return self.ahead

    def next(self, n: int) -> list[int]:
        if self.ahead:
            out, self.ahead = self.ahead, []
            if len(out) != n:
                raise ValueError(f"{len(out)} prompts were drawn ahead, {n} are asked for")
            return out
        out = []
        while len(out) < n:
            take = self._perm()[self.pos : self.pos + n - len(out)].tolist()
            out += take
            self.pos += len(take)
            if self.pos >= self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "ahead": list(self.ahead)}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos, self.ahead = s["epoch"], s["pos"], list(s.get("ahead", []))


def score(gens: Generations, prompts: PromptSet, n: int, reward_fn, timeout_s: float, max_len: int, buffer: int,
          penalty_scale: float = 1.0):
    """Per-response score, correctness and counts of failures; row i*n+j is sample j of prompt i."""
    graded = score_batch(reward_fn, gens.texts, [prompts.ground_truths[row // n] for row in range(len(gens.texts))],
                         timeout_s)
    scores = torch.tensor([r["score"] for r in graded], dtype=torch.float64)
    if buffer:
        lengths = gens.response_mask.sum(-1).tolist()
        scores += torch.tensor([penalty_scale * overlong_penalty(x, max_len, buffer) for x in lengths],
                               dtype=torch.float64)
    acc = torch.tensor([float(bool(r["acc"])) for r in graded])
    return scores.float(), acc, sum("error" in r for r in graded)


def sampling_params(cfg) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                          max_new_tokens=cfg.data.max_response_len)


def submit_next(engine, tokenizer, train: PromptSet, sampler: PromptSampler, cfg) -> None:
    """rollout.overlap: start sampling the next batch's first round now, from the weights of the last sync."""
    prompts = train.select(sampler.draw_ahead(cfg.rollout.prompts_per_step))
    texts = prompt_texts(prompts, tokenizer, cfg.data.chat_template)
    ids, _ = encode_prompts(texts, tokenizer, cfg.data.max_prompt_len)
    engine.submit(ids, sampling_params(cfg))


def collect(engine, tokenizer, train: PromptSet, sampler: PromptSampler, cfg, reward_fn) -> ScoredBatch:
    """Sample prompts_per_step groups of G responses; with dynamic sampling keep only groups whose
    *accuracy* differs (as DAPO: shaping such as the overlong penalty does not make an all-wrong group a
    signal), drawing more prompt batches until the batch is full (at most max_gen_batches)."""
    a, r, d = cfg.algo, cfg.rollout, cfg.data
    n, want = r.samples_per_prompt, r.prompts_per_step
    sampling = sampling_params(cfg)
    buffer = int(a.overlong_buffer_frac * d.max_response_len)
    kept: list[tuple] = []
    rounds = dropped = errors = truncated_prompts = 0
    while len(kept) < want:
        if rounds == a.max_gen_batches:
            raise DynamicSamplingError(
                f"dynamic sampling found {len(kept)} of {want} prompt groups with mixed accuracy after "
                f"{rounds} generation rounds; raise algo.max_gen_batches, rollout.samples_per_prompt, "
                "or set algo.dynamic_sampling=false")
        rounds += 1
        prompts = train.select(sampler.next(want))
        ids, cut = encode_prompts(prompt_texts(prompts, tokenizer, d.chat_template), tokenizer, d.max_prompt_len)
        truncated_prompts += cut
        gens = engine.generate(ids, sampling)
        scores, acc, errs = score(gens, prompts, n, reward_fn, d.reward_timeout_s, d.max_response_len, buffer,
                                  a.overlong_penalty)
        errors += errs
        for i in range(want):
            rows = slice(i * n, (i + 1) * n)
            if a.dynamic_sampling and bool((acc[rows] == acc[rows][0]).all()):
                dropped += 1
                continue
            kept.append((gens, rows, scores[rows], acc[rows]))
    kept = kept[:want]
    gens = concat_generations([_rows(g, s) for g, s, _, _ in kept])
    scores = torch.cat([s for _, _, s, _ in kept])
    acc = torch.cat([x for _, _, _, x in kept])
    stats = {"reward/errors": errors,  # health alarm, logged at 0: non-zero means the grader failed
             "data/prompts_truncated": truncated_prompts}  # data alarm, logged at 0: prompts cut to max_prompt_len
    if a.dynamic_sampling:  # without it every round is kept whole: 1 round, 0 dropped
        stats.update({"rollout/gen_rounds": rounds, "rollout/groups_dropped": dropped})
    return ScoredBatch(gens, scores, acc, torch.arange(want).repeat_interleave(n), stats)


def _rows(g: Generations, rows: slice) -> Generations:
    cut = lambda t: None if t is None else t[rows]
    return Generations(g.prompt_ids[rows], g.prompt_mask[rows], g.response_ids[rows], g.response_mask[rows],
                       g.texts[rows], g.truncated[rows], cut(g.sampler_logp), cut(g.sampler_entropy), g.policy_lag,
                       cut(g.ref_logp))
