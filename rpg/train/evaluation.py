"""Held-out evaluation of the policy: greedy accuracy and mean@k / pass@k / maj@k (docs/algorithms.md section 8)."""

from __future__ import annotations

import re

from rpg.train.build import EvalSet, encode_prompts, prompt_texts
from rpg.train.evaluate import summarize_eval
from rpg.rewards import get_reward_fn, score_safely
from rpg.rollout.base import SamplingParams


HEADLINE = re.compile(r"eval/(?P<set>[^/]+)/(?P<stat>greedy_acc|mean_at_\d+|pass_at_\d+)")


def headline(metrics: dict[str, float]) -> dict[str, dict[str, str]]:
    """{eval set: {stat: metric key}} of the held-out numbers a person reads first: greedy accuracy,
    mean@k and pass@k, in that order."""
    out: dict[str, dict[str, str]] = {}
    for key in sorted(metrics, key=lambda k: (k.split("/")[1:2], "greedy" not in k, "pass_at" in k, k)):
        m = HEADLINE.fullmatch(key)
        if m:
            out.setdefault(m["set"], {})[m["stat"]] = key
    return out


def evaluate_policy(engine, tokenizer, eval_sets: list[EvalSet], cfg, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Metrics ``eval/<set>/<metric>`` and one detail row per graded sample (for an artifact)."""
    metrics: dict[str, float] = {}
    details: list[dict] = []
    d = cfg.data
    for es in eval_sets:
        ids, _ = encode_prompts(prompt_texts(es.prompts, tokenizer, d.chat_template), tokenizer, d.max_prompt_len)
        runs = [("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=d.max_response_len))] if d.eval_greedy else []
        runs.append(("sampled", SamplingParams(n=es.k, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                               max_new_tokens=d.max_response_len)))
        for mode, sampling in runs:
            gens = engine.generate(ids, sampling)
            preds, correct, problem_ids = [], [], []
            for row, text in enumerate(gens.texts):
                i = row // sampling.n
                fn = get_reward_fn(es.prompts.data_sources[i])
                r = score_safely(fn, text, es.prompts.ground_truths[i], d.reward_timeout_s)
                preds.append(r.get("pred"))
                correct.append(bool(r["acc"]))
                problem_ids.append(es.prompts.problem_ids[i])
                details.append({"set": es.name, "mode": mode, "problem": es.prompts.problem_ids[i],
                                "response": text, "pred": r.get("pred"), "acc": bool(r["acc"]),
                                "ground_truth": es.prompts.ground_truths[i]})
            if mode == "greedy":
                metrics[f"eval/{es.name}/greedy_acc"] = sum(correct) / len(correct)
            else:
                ks = sorted({1, es.k})
                summary = summarize_eval(problem_ids, preds, correct, ks=ks, seed=seed)
                # MLflow refuses "@" in metric names: mean@4 is logged as mean_at_4.
                metrics.update({f"eval/{es.name}/{k.replace('@', '_at_')}": v for k, v in summary.items()})
    return metrics, details
