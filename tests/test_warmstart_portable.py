"""The default warm start is the same on every CPU: shipped weights, checked, and reproducible by its script.

Its early stop is a threshold on greedy answers, so training it on the host's kernels moved it by up to
280 steps between kernel sets; the default therefore loads shipped weights (rpg/models/warmstart_default).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rpg.models import warmstart
from rpg.models.warmstart import SHIPPED_DIR, WarmStartConfig, file_sha256, shipped_meta, warm_start

ROOT = Path(__file__).resolve().parents[1]

#: What a run's policy holds, hashed tensor by tensor, under a given kernel set and thread count.
POLICY_HASH = """
import json, sys, torch
from hydra import compose, initialize_config_dir
sys.path.insert(0, sys.argv[2])
from test_warmstart_portable import state_hash
from rpg.train.build import build_policy
from rpg.main import CONF_DIR
from rpg.config import register_configs
register_configs()
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose(config_name="config", overrides=[f"cache_dir={sys.argv[1]}"])
out = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    model, _, info = build_policy(cfg)
    out[threads] = [state_hash(model), info["warm_start_path"]]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "hashes": out}))
"""


def state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_shipped_default_matches_its_record():
    meta = shipped_meta()
    assert meta is not None, f"{SHIPPED_DIR} is missing"
    assert meta["key"] == WarmStartConfig().key(), "the defaults changed: regenerate with `python -m rpg.models.warmstart`"
    assert file_sha256(SHIPPED_DIR / "model.safetensors") == meta["sha256"]
    assert meta["kernels"] == "torch2.13.0-avx2" and meta["pinned"] == warmstart.PINNED_KERNELS
    assert 0.15 <= meta["heldout_greedy_acc"] <= 0.4  # the careless demonstrator's level: RL has headroom


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_default_policy_weights_are_the_same_on_every_kernel_set_and_thread_count(tmp_path, capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run([sys.executable, "-c", POLICY_HASH, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (h1, path1), (h2, path2) = result["hashes"]["1"], result["hashes"]["2"]
    assert path1 == path2 == str(SHIPPED_DIR), "the default run must load the shipped weights"
    from rpg.models.tiny import load_tiny

    assert h1 == h2 == state_hash(load_tiny(SHIPPED_DIR)[0]), result
    assert not any(tmp_path.iterdir()), "nothing is trained or cached for the default"


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(warmstart, "SHIPPED_DIR", copy)
    with pytest.raises(RuntimeError, match="SHA-256 .* regenerate it"):
        warm_start(cache_dir=str(tmp_path / "cache"), progress=False)


def test_other_settings_train_on_one_thread_and_key_on_the_kernel_set(tmp_path):
    import torch

    before = torch.get_num_threads()
    path = warm_start(WarmStartConfig(cache_dir=str(tmp_path), sft_steps=2, batch=4, target_fit=0.0, eval_problems=0),
                      progress=False)
    assert torch.get_num_threads() == before
    assert path.parent == tmp_path and path.name.endswith(f"-{warmstart.kernel_tag()}")
    assert json.loads((path / "warmstart.json").read_text())["kernels"] == warmstart.kernel_tag()


@pytest.mark.slow
def test_regeneration_script_reproduces_the_shipped_weights():
    """`python -m rpg.models.warmstart --check` retrains under the pinned kernels (~20 s) and compares checksums."""
    proc = subprocess.run([sys.executable, "-m", "rpg.models.warmstart", "--check"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "identical" in proc.stdout
