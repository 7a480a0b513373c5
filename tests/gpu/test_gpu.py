"""CUDA checks (marked ``gpu``): the CUDA wheel, bfloat16 generation through the project's vLLM engine with
sleep/wake and weight sync, and an NCCL all-reduce over the visible GPUs.

They skip on a machine without an NVIDIA GPU (no /dev/nvidiactl, no nvidia-smi) -- decided from the machine,
not from torch, so that a CPU-only torch on a GPU node fails the wheel check instead of skipping it.

    pytest -m gpu tests/gpu        # on a CUDA node with `pip install -e .[gpu]`
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

HAS_NVIDIA_GPU = os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_NVIDIA_GPU, reason="no NVIDIA GPU on this machine")]


def test_cuda_wheel_and_bf16_matmul():
    assert torch.version.cuda is not None, "torch is a CPU-only build on a GPU machine: install the CUDA wheel"
    assert torch.cuda.is_available(), "an NVIDIA GPU is present but torch cannot use it (driver / CUDA mismatch?)"
    assert torch.cuda.is_bf16_supported()
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(256, 256, device="cuda", generator=g)
    b = torch.randn(256, 256, device="cuda", generator=g)
    exact = a.double() @ b.double()
    got = (a.bfloat16() @ b.bfloat16()).double()
    # bf16 inputs: 8-bit mantissa, each product relative error <= 2^-8; sum of 256 terms of size ~1
    torch.testing.assert_close(got, exact, atol=0.5, rtol=0.02)
    assert (got - exact).abs().max() > 0  # really computed in reduced precision


def test_vllm_bf16_generation_sleep_wake_and_sync():
    pytest.importorskip("vllm")
    from rpg.models.tiny import build_char_tokenizer, build_tiny_model
    from rpg.rollout.base import SamplingParams
    from rpg.rollout.vllm import VLLMEngine

    tok = build_char_tokenizer()
    model = build_tiny_model(max_positions=256, seed=0, tokenizer=tok).to("cuda", torch.bfloat16)
    other = build_tiny_model(max_positions=256, seed=1, tokenizer=tok).to("cuda", torch.bfloat16)
    prompts = [tok.encode(p) for p in ("12+30=", "hello ", "Q: 7*6? A:")]
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    engine = VLLMEngine(model, tok, dtype="bfloat16", gpu_memory_utilization=0.2, enable_sleep_mode=True,
                        max_model_len=256, seed=0)
    try:
        first = engine.generate(prompts, greedy)
        assert first.response_ids.shape[0] == 6 and first.response_mask.sum() > 0
        assert torch.equal(first.response_ids[0], first.response_ids[1])  # greedy: both copies agree
        slp = first.sampler_logp[first.response_mask.bool()]
        assert torch.isfinite(slp).all() and (slp <= 1e-6).all()

        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake  # the KV cache went back to the device
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(prompts, greedy)
        engine.wake_up()
        again = engine.generate(prompts, greedy)
        assert torch.equal(again.response_ids, first.response_ids)  # same weights after sleep/wake

        engine.sleep()
        engine.sync_weights(other)  # wakes up, loads the other policy
        changed = engine.generate(prompts, greedy)
        assert not torch.equal(changed.response_ids, first.response_ids)
        engine.sync_weights(model)
        assert torch.equal(engine.generate(prompts, greedy).response_ids, first.response_ids)
    finally:
        engine.close()


def _all_reduce(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.full((1024,), float(rank + 1), device="cuda")
        dist.all_reduce(x)
        expected = world * (world + 1) / 2
        if not torch.equal(x, torch.full_like(x, expected)):
            raise AssertionError(f"rank {rank}: all_reduce gave {x[0].item()}, expected {expected}")
    finally:
        dist.destroy_process_group()


def test_nccl_all_reduce_over_visible_gpus():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    assert dist.is_nccl_available()
    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_all_reduce, args=(world, init_file), nprocs=world, join=True)  # raises if any rank failed
