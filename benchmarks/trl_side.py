"""TRL side of benchmarks/bench_trl.py: GRPOTrainer on the exported tiny model and toy prompts.

Run by bench_trl.py with the TRL venv's python; prints one line ``RESULT {json}`` with the wall time of
every optimizer step. Needs only torch, transformers, trl, datasets, plus ``rpg.rewards.math`` (pure
Python, found through PYTHONPATH) for the grader, so both sides score responses identically.

    python benchmarks/trl_side.py --export DIR --prompts 16 --samples 8 --max-len 20 --steps 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True, help="folder written by bench_trl.py: model/ and prompts.json")
    ap.add_argument("--prompts", type=int, required=True)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--max-len", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rpg.rewards.math import compute_score

    export = Path(args.export)
    spec = json.loads((export / "prompts.json").read_text())
    # AutoTokenizer would see model_type=qwen2 and swap in a byte-level pre-tokenizer that drops whitespace
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(export / "model"), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(export / "model"), dtype=torch.float32)
    data = datasets.Dataset.from_list([{"prompt": p, "ground_truth": g}
                                       for p, g in zip(spec["prompts"], spec["ground_truths"])])

    def grader(prompts, completions, ground_truth, **_):
        return [compute_score(c, g)["score"] for c, g in zip(completions, ground_truth)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    hp = spec["hparams"]
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        cfg = GRPOConfig(
            output_dir=out, report_to="none", use_cpu=True, seed=args.seed,
            max_steps=args.steps, logging_steps=max(args.steps, 1), save_strategy="no", eval_strategy="no",
            # one generation batch of prompts x samples completions per optimizer step, used once
            per_device_train_batch_size=args.prompts * args.samples, gradient_accumulation_steps=1,
            num_generations=args.samples, num_iterations=1, max_completion_length=args.max_len,
            temperature=hp["temperature"], top_p=1.0, top_k=0,
            beta=hp["beta"], epsilon=hp["clip_low"], epsilon_high=hp["clip_high"],
            loss_type="grpo", scale_rewards="group",  # per-sequence token mean, group z-score (rpg's grpo)
            learning_rate=hp["lr"], weight_decay=hp["weight_decay"], adam_beta1=hp["betas"][0],
            adam_beta2=hp["betas"][1], max_grad_norm=hp["grad_clip"], lr_scheduler_type="constant",
            warmup_steps=0, optim="adamw_torch", disable_dropout=True, bf16=False, fp16=False,
            dataloader_num_workers=0, log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=grader, args=cfg, train_dataset=data,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()

    print("RESULT " + json.dumps({
        "step_s": times, "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
