"""The dry-run estimator (rpg.launch.plan): exact parameter counts, memory terms, the CLI report and its warnings."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from rpg.launch import plan
from rpg.config import ConfigError, register_configs
from rpg.main import CONF_DIR
from rpg.launch.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
GPU = ["engine=gpu", "data=dapo_math_17k"]


def cfg_of(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def model_arch(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml").arch)


@pytest.mark.parametrize("arch", [
    {"model_type": "qwen2", "vocab_size": 257, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    {"model_type": "qwen2", "vocab_size": 99, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
     "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True},
    {"model_type": "qwen3", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True},
], ids=["qwen2-untied", "qwen2-tied", "qwen3-head_dim"])
def test_param_count_equals_the_built_model(arch):
    config = AutoConfig.for_model(**arch, max_position_embeddings=64)
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(config)
    assert plan.param_count(plan.Arch.from_dict(arch)) == sum(p.numel() for p in model.parameters())


def test_real_models_match_their_published_sizes():
    qwen3 = plan.Arch.from_dict(model_arch("qwen3_4b"))
    total = plan.param_count(qwen3)
    assert total == 4_022_468_096  # model card: 4.0B parameters
    assert round((total - qwen3.vocab_size * qwen3.hidden_size) / 1e9, 1) == 3.6  # card: 3.6B non-embedding
    for name in ("qwen2_5_7b_instruct", "qwen2_5_math_7b"):
        q = plan.Arch.from_dict(model_arch(name))
        assert plan.param_count(q) == 7_615_616_512  # card: 7.61B parameters
        assert round((plan.param_count(q) - 2 * q.vocab_size * q.hidden_size) / 1e9, 2) == 6.53  # non-embedding


def test_sharded_terms_halve_with_twice_the_gpus():
    a = plan.Arch.from_dict(model_arch("qwen3_4b"))
    s = plan.Setup(world=8, state_bytes=4, compute_bytes=2, fsdp=True, micro_rows=4, prompt_len=2048,
                   response_len=2048, gradient_checkpointing=True, logprob_chunk=1024, reference=True, cuda=True,
                   vllm_fraction=0.6, vllm_sleep=True, gpu_bytes=80 * plan.GIB)
    t8, t16 = plan.memory_terms(a, s)["train"], plan.memory_terms(a, replace(s, world=16))["train"]
    n = plan.param_count(a)
    assert t8["weights"] == n * 4 / 8 and t8["optimizer (AdamW m, v)"] == 2 * n * 4 / 8
    assert t8["reference copy"] == n * 4 / 8  # a frozen copy of the float32 policy, sharded
    for key in ("weights", "gradients", "optimizer (AdamW m, v)", "reference copy"):
        assert t16[key] == t8[key] / 2, key
    for key in ("activations (checkpointed)", "log-prob head inputs kept for backward", "log-prob chunk buffers",
                "FSDP gathered weights + grads"):
        assert t16[key] == t8[key], key
    full = plan.memory_terms(a, replace(s, gradient_checkpointing=False))["train"]["activations"]
    assert full == 36 * 4 * 4096 * plan.activation_values_per_token_layer(a) * 2
    assert t8["activations (checkpointed)"] < full / 10
    assert "reference copy" not in plan.memory_terms(a, replace(s, reference=False))["train"]
    awake = plan.memory_terms(a, replace(s, vllm_sleep=False))["train"]
    assert awake["vLLM (awake)"] == 0.6 * 80 * plan.GIB


def test_log_prob_terms_follow_the_checkpointed_chunks():
    """No logits are kept across the micro-batch: only the head's inputs grow with it, the chunk buffers do not."""
    a = plan.Arch.from_dict(model_arch("qwen3_4b"))
    s = plan.Setup(world=8, state_bytes=4, compute_bytes=2, fsdp=True, micro_rows=4, prompt_len=2048,
                   response_len=8192, gradient_checkpointing=True, logprob_chunk=1024, reference=False, cuda=True,
                   vllm_fraction=0.6, vllm_sleep=True, gpu_bytes=80 * plan.GIB)
    t = plan.memory_terms(a, s)["train"]
    assert not any("logits" in key for key in t)
    assert t["log-prob head inputs kept for backward"] == 4 * 8192 * (2560 * 2 + 8 + 4)  # bf16 states, ids, logp
    assert t["log-prob chunk buffers"] == 1024 * 151936 * 4 * 4  # four float32 [chunk, vocab] buffers
    big = plan.memory_terms(a, replace(s, micro_rows=16))["train"]
    assert big["log-prob head inputs kept for backward"] == 4 * t["log-prob head inputs kept for backward"]
    assert big["log-prob chunk buffers"] == t["log-prob chunk buffers"]
    wide = plan.memory_terms(a, replace(s, logprob_chunk=4096))["train"]
    assert wide["log-prob chunk buffers"] == 4 * t["log-prob chunk buffers"]
    assert wide["log-prob head inputs kept for backward"] == t["log-prob head inputs kept for backward"]
    short = plan.memory_terms(a, replace(s, micro_rows=1, response_len=512))["train"]  # chunk > response tokens
    assert short["log-prob chunk buffers"] == 512 * 151936 * 4 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_inputs_term_is_what_autograd_saves(dtype):
    """Every tensor saved for backward by the chunked log-prob head, outside its checkpoints, adds up to the term."""
    from types import SimpleNamespace

    from rpg.models.logprobs import response_logprobs

    rows, prompt, response, hidden, vocab, chunk = 3, 5, 40, 16, 1009, 16
    torch.manual_seed(0)
    states = torch.randn(rows, prompt + response, hidden, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    model = SimpleNamespace(get_decoder=lambda: lambda **_: SimpleNamespace(last_hidden_state=states * 1),
                            get_output_embeddings=lambda: head)
    ids = torch.randint(0, vocab, (rows, prompt + response))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = response_logprobs(model, ids, torch.ones_like(ids), prompt, chunk_tokens=chunk)
    a = plan.Arch.from_dict({"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden,
                             "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
    s = plan.Setup(world=1, state_bytes=4, compute_bytes=plan.DTYPE_BYTES[str(dtype).split(".")[1]], fsdp=False,
                   micro_rows=rows, prompt_len=prompt, response_len=response, gradient_checkpointing=False,
                   logprob_chunk=chunk, reference=False, cuda=False, vllm_fraction=0.0, vllm_sleep=False, gpu_bytes=0)
    term = plan.memory_terms(a, s)["train"]["log-prob head inputs kept for backward"]
    assert logp.shape == (rows, response) and logp.dtype == torch.float32
    assert max(saved.values()) < chunk * vocab * 4  # nothing logit-sized survives the forward
    assert sum(saved.values()) + logp.numel() * 4 == term
    logp.sum().backward()
    assert states.grad is not None and head.weight.grad is not None


def test_paper_setting_fits_and_a_too_large_micro_batch_warns():
    est = plan.estimate(cfg_of(*GPU, "model=qwen3_4b", "context=8k"))
    assert est["totals"]["train"] < 80 * plan.GIB and est["totals"]["generate"] < 80 * plan.GIB
    assert not [w for w in est["warnings"] if "per GPU" in w]
    assert est["tokens"]["optimizer steps per RL step"] == 16 and est["tokens"]["responses per RL step"] == 8192
    big = plan.estimate(cfg_of(*GPU, "model=qwen3_4b", "context=8k", "ppo.micro_batch_size=64"))
    assert big["setup"].micro_rows == 64 and big["totals"]["train"] > 80 * plan.GIB
    (warning,) = [w for w in big["warnings"] if w.startswith("training needs")]
    assert "ppo.micro_batch_size (now 64)" in warning and "engine.gpu_memory_gib=80" in warning
    assert "engine.logprob_chunk" not in warning  # the chunk does not grow with the micro-batch
    wide = plan.estimate(cfg_of(*GPU, "model=qwen3_4b", "context=8k", "engine.logprob_chunk=32768"))
    (warning,) = [w for w in wide["warnings"] if w.startswith("training needs")]
    assert "lower engine.logprob_chunk (now 32768)" in warning and "ppo.micro_batch_size" not in warning
    no_ckpt = plan.estimate(cfg_of(*GPU, "model=qwen3_4b", "context=8k", "model.gradient_checkpointing=false"))
    assert any("model.gradient_checkpointing=true" in w for w in no_ckpt["warnings"])
    greedy_vllm = plan.estimate(cfg_of(*GPU, "model=qwen2_5_7b_instruct", "engine.vllm_gpu_memory_utilization=0.95"))
    assert any("lower engine.vllm_gpu_memory_utilization" in w for w in greedy_vllm["warnings"])
    split = plan.estimate(cfg_of(*GPU, "model=qwen3_4b", "context=2k", "ppo.micro_batch_size=48"))
    assert any("does not split over 8 ranks" in w for w in split["warnings"])  # 512 / 8 = 64 rows per rank
    whole = plan.estimate(cfg_of(*GPU, "model=qwen3_4b", "context=2k", "ppo.micro_batch_size=128"))
    assert not any("does not split" in w for w in whole["warnings"])  # >= 64: one forward per rank
    assert not any("does not split" in w for w in est["warnings"])
    short = plan.estimate(cfg_of(*GPU, "model=qwen2_5_math_7b", "context=4k"))
    assert any("exceeds the model's 4096 positions" in w for w in short["warnings"])


def test_config_json_at_model_path_wins(tmp_path):
    arch = model_arch("qwen2_5_7b_instruct") | {"num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(arch))
    est = plan.estimate(cfg_of(*GPU, "model=qwen2_5_7b_instruct", f"model.path={tmp_path}"))
    assert est["source"] == str(tmp_path / "config.json") and est["arch"].num_hidden_layers == 2
    assert any("model.arch disagrees" in w for w in est["warnings"])
    assert not any("holds no config.json" in w for w in est["warnings"])


def test_dry_run_validates_first():
    with pytest.raises(ConfigError, match="ppo.micro_batch_size=3 must divide"):
        plan.dry_run(cfg_of(*GPU, "model=qwen3_4b", "ppo.micro_batch_size=3"), out=io.StringIO())


def test_context_presets_repeat_the_paper_sweeps():
    """The +context presets and the paper sweeps' fixed blocks state the same Appendix H values."""
    for name, context in (("main", "2k"), ("clip_ablation", "2k"), ("kl_ablation", "4k"), ("qwen2_5_7b", "4k")):
        fixed = load_sweep(REPO / "sweeps" / f"{name}.yaml").base
        cfg = OmegaConf.to_container(cfg_of(*GPU, "model=qwen3_4b", f"context={context}"), resolve=True)
        for key, value in fixed.items():
            if key in ("model", "data", "engine", "algo") or key.startswith("algo."):
                continue
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)


def test_dry_run_command(tmp_path):
    cmd = [sys.executable, "-m", "rpg.main", "dry_run=true", "engine=gpu", "model=qwen3_4b", "data=dapo_math_17k",
           "context=2k", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {"RPG_MODELS_DIR": str(tmp_path / "models"), "RPG_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4,022,468,096 parameters" in out and "an estimate" in out
    assert "log-prob head inputs kept for backward" in out and "vLLM weights + KV cache" in out
    assert "logits kept" not in out
    assert "of 80 GiB: fits" in out and "DOES NOT FIT" not in out
    assert f"WARNING: model.path={tmp_path / 'models'}/Qwen3-4B holds no config.json" in out
    assert f"WARNING: data.train_path={tmp_path / 'data'}/dapo-math-17k.parquet not found: set data.train_path=" in out
    assert not (tmp_path / "outputs").exists()


def test_sweep_estimates_cover_gpu_runs_and_skip_cpu_runs():
    gpu = OmegaConf.to_container(cfg_of(*GPU, "model=qwen3_4b", "context=8k"), resolve=True)
    cpu = OmegaConf.to_container(cfg_of(), resolve=True)
    out = io.StringIO()
    plan.sweep_estimates([("algo=a,seed=1", gpu), ("algo=b,seed=1", cpu)], out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "memory estimate: skipped for 1 CPU run(s) (engine.device=cpu)"
    (row,) = [ln for ln in lines if ln.startswith("algo=a")]
    assert "4.02B" in row and not any(ln.startswith("algo=b") for ln in lines)
    out = io.StringIO()
    plan.sweep_estimates([("algo=b,seed=1", cpu)], out)
    assert out.getvalue().count("\n") == 1  # only the note
