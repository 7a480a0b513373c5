#!/usr/bin/env bash
# Create .venv and install rpg (torch first and exactly: a range would pull a multi-GB CUDA build).
#   RPG_TORCH_INDEX_URL=URL  install torch from that package index, e.g. https://download.pytorch.org/whl/cpu
#                            for the CPU wheel (unset: pip's configured index; from PyPI, Linux x86_64 gets the CUDA build)
#   RPG_SETUP_DRY_RUN=1      print the commands without running them
set -euo pipefail
cd "$(dirname "$0")/.."
dry=${RPG_SETUP_DRY_RUN:-0}
run() {  # print a command, then run it (unless dry)
  echo "+ $*"
  if [[ $dry != 1 ]]; then "$@"; fi
}
torch_index=()
if [[ -n ${RPG_TORCH_INDEX_URL:-} ]]; then
  torch_index=(--index-url "$RPG_TORCH_INDEX_URL")
  echo "setup.sh: torch 2.13.0 from $RPG_TORCH_INDEX_URL"
else
  echo "setup.sh: torch 2.13.0 from pip's configured index (for the CPU wheel: RPG_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)"
fi
python=$(command -v python3.11 || command -v python3 || echo python3.11)
run "$python" -m venv .venv
run . .venv/bin/activate
run pip install -q --upgrade pip
run pip install -q ${torch_index[@]+"${torch_index[@]}"} torch==2.13.0  # (empty array: safe under set -u in bash < 4.4)
run pip install -q -e ".[dev]"
