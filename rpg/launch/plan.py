"""Size, per-GPU memory and tokens of a run, from its config alone: what ``dry_run=true`` prints.

    python -m rpg.main dry_run=true engine=gpu model=qwen3_4b data=dapo_math_17k [context=8k] [KEY=VALUE ...]

Nothing is loaded: the architecture comes from ``model.path/config.json`` when that exists, else from
``model.arch`` (the published values, conf/model/*.yaml). Every memory number is an ESTIMATE of the
steady state, built from these assumptions (bytes per GPU, ``world = engine.num_gpus x engine.nodes``):

- weights, gradients and both AdamW moments live in ``engine.param_dtype``, sharded over ``world``
  (backend=fsdp); backend=local keeps them whole, in ``engine.dtype`` (what rpg.train.build does);
- FSDP gathers the root module (embeddings, final norm, output head) and two decoder layers (the one
  running and the prefetched one) in ``engine.dtype``; one layer's and the root's unsharded gradients
  exist at a time, in float32 (the reduce dtype under mixed precision);
- a reference copy (a frozen copy of the policy: ``engine.param_dtype``, sharded) exists only when
  ``algo.ref_update`` is not every_step;
- ``ppo.mini_batch_size`` responses per optimizer step are split evenly over the ranks and each rank
  runs them ``ppo.micro_batch_size`` at a time (so one GPU's micro-batch is the smaller of the two,
  micro_batch_size and mini_batch_size / world), each response padded to the full
  ``data.max_prompt_len + data.max_response_len`` (an upper bound: real batches are trimmed to their
  longest response);
- activations per token and decoder layer: about (10 H + 6 q + 4 kv + 4 I) values in ``engine.dtype``
  (H hidden, q = heads x head_dim, kv = kv_heads x head_dim, I intermediate), what autograd keeps for
  RMSNorm, q/k/v/o, RoPE, SDPA attention and the SwiGLU MLP; with gradient checkpointing only each
  layer's input (H values) is kept, plus one layer's full set while it is recomputed;
- rpg.models.logprobs.response_logprobs projects ``engine.logprob_chunk`` positions at a time to the vocabulary
  in float32; with gradients on, each chunk runs under activation checkpointing, so no logits are kept
  for backward. What the micro-batch keeps is what the checkpoints save, the head's inputs: the final
  hidden states of the response positions ([responses x response_len, hidden] in ``engine.dtype``) and
  their int64 target ids, plus the float32 log-prob of each response token. Logits exist for one chunk
  at a time: about four [chunk, vocab] float32 buffers while a chunk is computed, or recomputed and
  differentiated in backward (the logits, the logsumexp and gather gradients and their sum). The hidden
  states' gradient, as large as the states, exists only while the head's backward runs (not counted);
- vLLM holds ``engine.vllm_gpu_memory_utilization`` of the GPU while generating; asleep
  (``engine.vllm_sleep``) it holds nothing during training (CUDA-graph pools not counted);
- a fixed 2 GiB on CUDA for the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rpg.config import ranks_per_node
from rpg.config.mechanisms import inert_mechanisms, optimizer_steps_per_rl_step

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_OVERHEAD_BYTES = 2 * GIB
LOGPROB_CHUNK_BUFFERS = 4  # [chunk, vocab] float32 buffers alive at once in the chunked log-prob head
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
             "max_position_embeddings", "attention_bias")


@dataclass(frozen=True)
class Arch:
    """A Qwen2/Qwen3-style decoder: the facts the estimate needs (names as in transformers' configs)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool  # bias on q/k/v (Qwen2: yes; Qwen3: no)
    qk_norm: bool  # RMSNorm over each head of q and k (Qwen3)

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        missing = [k for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"model architecture lacks {missing}: fill model.arch (conf/model/*.yaml) or "
                             "point model.path at a checkpoint with config.json")
        mt = str(d["model_type"])
        if mt not in ("qwen2", "qwen3"):
            raise ValueError(f"model_type={mt!r}: the estimate knows qwen2 and qwen3 decoders")
        heads = int(d["num_attention_heads"])
        return cls(mt, int(d["vocab_size"]), int(d["hidden_size"]), int(d["intermediate_size"]),
                   int(d["num_hidden_layers"]), heads, int(d.get("num_key_value_heads") or heads),
                   int(d.get("head_dim") or d["hidden_size"] // heads), bool(d.get("tie_word_embeddings", False)),
                   int(d.get("max_position_embeddings", 0)), bool(d.get("attention_bias", mt == "qwen2")),
                   mt == "qwen3")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


def layer_params(a: Arch) -> int:
    """One decoder layer: q/k/v/o projections (+ q/k/v biases, + q/k norms), SwiGLU MLP, two RMSNorms."""
    h = a.hidden_size
    attn = h * a.q_dim + 2 * h * a.kv_dim + a.q_dim * h
    attn += (a.q_dim + 2 * a.kv_dim) if a.attention_bias else 0
    attn += 2 * a.head_dim if a.qk_norm else 0
    return attn + 3 * h * a.intermediate_size + 2 * h


def root_params(a: Arch) -> int:
    """Embeddings, final norm and output head (counted once when tied)."""
    emb = a.vocab_size * a.hidden_size
    return emb * (1 if a.tie_word_embeddings else 2) + a.hidden_size


def param_count(a: Arch) -> int:
    """Exact parameter count of transformers' Qwen2ForCausalLM / Qwen3ForCausalLM for this architecture."""
    return a.num_hidden_layers * layer_params(a) + root_params(a)


def activation_values_per_token_layer(a: Arch) -> int:
    """Values autograd keeps per token in one decoder layer (see the module docstring)."""
    return 10 * a.hidden_size + 6 * a.q_dim + 4 * a.kv_dim + 4 * a.intermediate_size


@dataclass(frozen=True)
class Setup:
    """The knobs of one run that the estimate depends on (all taken from the config)."""

    world: int  # ranks the model state is sharded over (1 for backend=local)
    state_bytes: int  # bytes per value of weights / gradients / optimizer state
    compute_bytes: int  # bytes per value in forward/backward (engine.dtype)
    fsdp: bool
    micro_rows: int  # responses per forward/backward on one GPU
    prompt_len: int
    response_len: int
    gradient_checkpointing: bool
    logprob_chunk: int
    reference: bool  # a separate reference copy is kept
    cuda: bool
    vllm_fraction: float  # share of GPU memory vLLM takes while generating (0: no colocated vLLM)
    vllm_sleep: bool
    gpu_bytes: float  # memory of one GPU


def memory_terms(a: Arch, s: Setup) -> dict[str, dict[str, float]]:
    """Bytes per GPU by phase: {"train": {term: bytes}, "generate": {term: bytes}}."""
    n = param_count(a)
    shard = n / s.world
    train = {"weights": shard * s.state_bytes, "gradients": shard * s.state_bytes,
             "optimizer (AdamW m, v)": 2 * shard * s.state_bytes}
    if s.reference:
        train["reference copy"] = shard * s.state_bytes
    if s.fsdp:
        gathered = root_params(a) + 2 * layer_params(a)
        grad_bytes = 4 if s.compute_bytes != s.state_bytes else s.state_bytes
        train["FSDP gathered weights + grads"] = (gathered * s.compute_bytes
                                                 + (root_params(a) + layer_params(a)) * grad_bytes)
    tokens = s.micro_rows * (s.prompt_len + s.response_len)
    full_layer = tokens * activation_values_per_token_layer(a) * s.compute_bytes
    if s.gradient_checkpointing:
        train["activations (checkpointed)"] = a.num_hidden_layers * tokens * a.hidden_size * s.compute_bytes + full_layer
    else:
        train["activations"] = a.num_hidden_layers * full_layer
    resp_tokens = s.micro_rows * s.response_len
    train["log-prob head inputs kept for backward"] = resp_tokens * (a.hidden_size * s.compute_bytes + 8 + 4)
    train["log-prob chunk buffers"] = min(s.logprob_chunk, resp_tokens) * a.vocab_size * 4 * LOGPROB_CHUNK_BUFFERS
    if s.vllm_fraction and not s.vllm_sleep:
        train["vLLM (awake)"] = s.vllm_fraction * s.gpu_bytes
    generate = {k: train[k] for k in ("weights", "optimizer (AdamW m, v)", "reference copy") if k in train}
    if s.vllm_fraction:
        generate["vLLM weights + KV cache"] = s.vllm_fraction * s.gpu_bytes
    if s.cuda:
        train["CUDA context, NCCL, fragmentation"] = generate["CUDA context, NCCL, fragmentation"] = CUDA_OVERHEAD_BYTES
    return {"train": train, "generate": generate}


def tokens_per_step(cfg) -> dict[str, float]:
    """Batch arithmetic of one RL step (upper bounds: every response at full length)."""
    r, u, d = cfg.rollout, cfg.ppo, cfg.data
    responses = r.prompts_per_step * r.samples_per_prompt
    world = _world(cfg)
    return {"responses per RL step": responses,
            "tokens per RL step (upper bound)": responses * (d.max_prompt_len + d.max_response_len),
            "response tokens per RL step (upper bound)": responses * d.max_response_len,
            "responses per optimizer step": u.mini_batch_size,
            "optimizer steps per RL step": optimizer_steps_per_rl_step(cfg),
            "responses per GPU per optimizer step": u.mini_batch_size / world,
            "micro-batches per GPU per optimizer step": math.ceil(u.mini_batch_size / world / u.micro_batch_size),
            "RL steps": cfg.steps}


def _world(cfg) -> int:
    return ranks_per_node(cfg.engine) * (max(cfg.engine.nodes, 1) if cfg.engine.backend == "fsdp" else 1)


def resolve_arch(cfg) -> tuple[Arch, str, list[str]]:
    """(architecture, where it came from, warnings); config.json at model.path wins over model.arch."""
    m, warnings = cfg.model, []
    if m.kind == "tiny":
        from rpg.models.tiny import build_char_tokenizer
        from rpg.models.warmstart import WarmStartConfig

        w = WarmStartConfig(**{k: v for k, v in dict(m.warm_start).items() if k in WarmStartConfig.__dataclass_fields__})
        arch = {"model_type": "qwen2", "vocab_size": len(build_char_tokenizer()), "hidden_size": w.hidden,
                "intermediate_size": w.intermediate, "num_hidden_layers": w.layers, "num_attention_heads": w.heads,
                "num_key_value_heads": w.kv_heads, "tie_word_embeddings": True, "max_position_embeddings": w.max_positions}
        return Arch.from_dict(arch), "the embedded tiny model (model.warm_start)", warnings
    config_json = Path(str(m.path or "")).expanduser() / "config.json"
    published = dict(m.arch or {})
    if m.path and config_json.is_file():
        found = json.loads(config_json.read_text())
        found = found.get("text_config", found)
        arch = Arch.from_dict({k: found[k] for k in ARCH_KEYS if k in found})
        if published and param_count(Arch.from_dict(published)) != param_count(arch):
            warnings.append(f"model.arch disagrees with {config_json} ({param_count(Arch.from_dict(published)):,} vs "
                            f"{param_count(arch):,} parameters); the checkpoint's config.json is used")
        return arch, str(config_json), warnings
    warnings.append(f"model.path={m.path} holds no config.json: training would stop there; set model.path="
                    "/abs/path/to/checkpoint (or RPG_MODELS_DIR=<folder holding it>)")
    if not published:
        raise ValueError(f"model {m.name}: no config.json at model.path and no model.arch; fill model.arch "
                         "(conf/model/*.yaml) or point model.path at a local checkpoint")
    return Arch.from_dict(published), "model.arch (published config.json values)", warnings


def estimate(cfg) -> dict:
    """Everything the dry-run prints: arch, parameter count, memory by phase, tokens, warnings."""
    arch, source, warnings = resolve_arch(cfg)
    e, d = cfg.engine, cfg.data
    cuda = str(e.device).startswith("cuda")
    fsdp = e.backend == "fsdp"
    world = _world(cfg)
    micro_rows = min(cfg.ppo.micro_batch_size, math.ceil(cfg.ppo.mini_batch_size / world))
    setup = Setup(world=world, state_bytes=DTYPE_BYTES[e.param_dtype if fsdp else e.dtype],
                  compute_bytes=DTYPE_BYTES[e.dtype], fsdp=fsdp, micro_rows=micro_rows,
                  prompt_len=d.max_prompt_len, response_len=d.max_response_len,
                  gradient_checkpointing=bool(cfg.model.gradient_checkpointing), logprob_chunk=e.logprob_chunk,
                  reference=cfg.algo.ref_update != "every_step", cuda=cuda,
                  vllm_fraction=e.vllm_gpu_memory_utilization if (cuda and e.rollout == "vllm") else 0.0,
                  vllm_sleep=bool(e.vllm_sleep), gpu_bytes=e.gpu_memory_gib * GIB)
    terms = memory_terms(arch, setup)
    totals = {phase: sum(t.values()) for phase, t in terms.items()}
    warnings += memory_warnings(cfg, arch, setup, terms, totals) if cuda else []
    warnings += path_warnings(cfg) + inert_mechanisms(cfg)
    per_rank = cfg.ppo.mini_batch_size / world
    micro = cfg.ppo.micro_batch_size
    if fsdp and (per_rank % 1 or (micro < per_rank and per_rank % micro)):
        warnings.append(f"ppo.mini_batch_size={cfg.ppo.mini_batch_size} does not split over {world} ranks into whole "
                        f"micro-batches of ppo.micro_batch_size={cfg.ppo.micro_batch_size} (the FSDP backend refuses "
                        "it): make ppo.micro_batch_size divide ppo.mini_batch_size / (engine.num_gpus x engine.nodes)")
    if arch.max_position_embeddings and d.max_prompt_len + d.max_response_len > arch.max_position_embeddings:
        warnings.append(f"data.max_prompt_len + data.max_response_len = {d.max_prompt_len + d.max_response_len} "
                        f"exceeds the model's {arch.max_position_embeddings} positions: lower data.max_response_len")
    return {"arch": arch, "source": source, "params": param_count(arch), "setup": setup, "terms": terms,
            "totals": totals, "tokens": tokens_per_step(cfg), "warnings": warnings}


def memory_warnings(cfg, a: Arch, s: Setup, terms: dict, totals: dict) -> list[str]:
    """What to change when a phase does not fit in engine.gpu_memory_gib, biggest lever first."""
    out, budget, train = [], s.gpu_bytes, terms["train"]
    if totals["train"] > budget:
        fixes = []
        act = train.get("activations")
        if act is not None and act > 0.1 * budget:
            fixes.append("set model.gradient_checkpointing=true")
        elif train.get("activations (checkpointed)", 0) > 0.2 * budget:
            fixes.append(f"lower ppo.micro_batch_size (now {s.micro_rows}) or data.max_response_len: the "
                         f"micro-batch's activations alone take {_gib(train['activations (checkpointed)'])}")
        if train["log-prob chunk buffers"] > 0.1 * budget:
            fixes.append(f"lower engine.logprob_chunk (now {s.logprob_chunk}): one chunk's float32 logits and their "
                         f"gradients alone take {_gib(train['log-prob chunk buffers'])}")
        if train["weights"] + train["gradients"] + train["optimizer (AdamW m, v)"] > 0.3 * budget:
            fixes.append(f"raise engine.num_gpus / engine.nodes (now sharded over {s.world})")
        if "vLLM (awake)" in train:
            fixes.append("set engine.vllm_sleep=true")
        fixes = fixes or ["lower ppo.micro_batch_size"]
        out.append(f"training needs about {_gib(totals['train'])} per GPU, more than engine.gpu_memory_gib="
                   f"{cfg.engine.gpu_memory_gib:g}: " + "; ".join(fixes))
    if totals["generate"] > budget:
        out.append(f"generation needs about {_gib(totals['generate'])} per GPU, more than engine.gpu_memory_gib="
                   f"{cfg.engine.gpu_memory_gib:g}: lower engine.vllm_gpu_memory_utilization "
                   f"(now {s.vllm_fraction:g}) or raise engine.num_gpus")
    return out


def path_warnings(cfg) -> list[str]:
    """Inputs the run would need but that are not on this machine (the dry-run itself needs none)."""
    from rpg.data import resolve_path

    d, out = cfg.data, []
    if d.kind != "toy":
        if not d.train_path:
            out.append(f"data {d.name}: data.train_path is unset; set data.train_path=/abs/path/train.parquet")
        else:
            try:
                resolve_path(d.train_path)
            except FileNotFoundError:
                out.append(f"data.train_path={d.train_path} not found: set data.train_path=/abs/path/to/file.parquet "
                           "(verl schema, data/benchmarks/README.md) or RPG_DATA_DIR=<folder holding it>")
    for e in d.eval_sets:
        if not e.path.startswith("toy:"):
            try:
                resolve_path(e.path)
            except FileNotFoundError:
                out.append(f"eval set {e.name}: {e.path} not found")
    return out


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB" if x >= GIB / 10 else f"{x / (1 << 20):.1f} MiB"


def format_report(cfg, est: dict) -> str:
    """The dry-run's text: one block per section, then the warnings."""
    a, s, e = est["arch"], est["setup"], cfg.engine
    lines = [f"dry run: {cfg.algo.name} on {cfg.model.name} / {cfg.data.name}, engine {e.name} "
             f"({e.backend}, {s.world} rank{'s' if s.world > 1 else ''}, compute {e.dtype}, "
             f"state {e.param_dtype if s.fsdp else e.dtype}) - an estimate, not a measurement",
             f"model: {est['params']:,} parameters ({est['params'] / 1e9:.2f} B) from {est['source']}",
             f"  {a.model_type}: vocab {a.vocab_size}, hidden {a.hidden_size}, {a.num_hidden_layers} layers, "
             f"{a.num_attention_heads} heads / {a.num_key_value_heads} kv x {a.head_dim}, intermediate "
             f"{a.intermediate_size}, tied embeddings {a.tie_word_embeddings}",
             f"micro-batch: {s.micro_rows} responses x ({s.prompt_len} + {s.response_len}) tokens per rank, gradient "
             f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, log-prob chunk {s.logprob_chunk}"]
    for phase, title in (("train", "training phase"), ("generate", "generation phase")):
        lines.append(f"memory per {'GPU' if s.cuda else 'process'}, {title}:")
        lines += [f"  {name:<38} {_gib(v):>10}" for name, v in est["terms"][phase].items()]
        fits = "fits" if est["totals"][phase] <= s.gpu_bytes else "DOES NOT FIT"
        budget = f"of {e.gpu_memory_gib:g} GiB: {fits}" if s.cuda else "(CPU run: no GPU budget)"
        lines.append(f"  {'total':<38} {_gib(est['totals'][phase]):>10}   {budget}")
    lines.append("tokens:")
    lines += [f"  {k:<42} {v:>14,.0f}" for k, v in est["tokens"].items()]
    lines += [f"WARNING: {w}" for w in est["warnings"]]
    return "\n".join(lines)


def dry_run(cfg, out=None) -> dict:
    """Validate ``cfg``, print the report; returns the estimate."""
    import sys

    from rpg.train.build import check_toy_split
    from rpg.config import validate

    validate(cfg)
    check_toy_split(cfg)
    est = estimate(cfg)
    (out or sys.stdout).write(format_report(cfg, est) + "\n")
    return est


def sweep_estimates(named_configs, out=None) -> None:
    """One line per run of a sweep (resolved config dicts), then each distinct warning once."""
    import sys

    from omegaconf import OmegaConf

    out = out or sys.stdout
    cpu = [name for name, config in named_configs if not str(config["engine"]["device"]).startswith("cuda")]
    if cpu:  # the estimate is of GPU memory; a CPU run has nothing to check
        out.write(f"memory estimate: skipped for {len(cpu)} CPU run(s) (engine.device=cpu)\n")
    named_configs = [(name, config) for name, config in named_configs if name not in cpu]
    if not named_configs:
        return
    width = max([len(name) for name, _ in named_configs] + [3])
    out.write(f"{'RUN':<{width}}  {'PARAMS':>7}  {'TRAIN/GPU':>9}  {'GEN/GPU':>9}  {'GPU':>5}  TOKENS/STEP (max)\n")
    seen = []
    for name, config in named_configs:
        est = estimate(OmegaConf.create(config))
        t = est["totals"]
        out.write(f"{name:<{width}}  {est['params'] / 1e9:6.2f}B  {t['train'] / GIB:8.1f}G  {t['generate'] / GIB:8.1f}G  "
                  f"{config['engine']['gpu_memory_gib']:4g}G  {est['tokens']['tokens per RL step (upper bound)']:,.0f}\n")
        seen += [w for w in est["warnings"] if w not in seen]
    out.write("".join(f"WARNING: {w}\n" for w in seen))
