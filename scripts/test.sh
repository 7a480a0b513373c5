#!/usr/bin/env bash
# Install everything from scratch and run the whole test suite (what CI runs).
# As root it also installs the Debian packages of the local SLURM cluster (and chromium, for the MLflow UI
# check) and the CPU build of vLLM
# (in .venv-vllm), so the SLURM and vLLM tests run instead of being skipped.
# The whole suite (no arguments) then runs the tests marked `kernels` (exact resume, learning and clip
# thresholds) again under a second CPU kernel set: avx2 where the machine's own is AVX-512, else the scalar set
# (there without the vLLM test: torch inductor's scalar code, which the CPU build of vLLM compiles, fails to build).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
  ./slurm/local_cluster.sh install
  export RPG_REQUIRE_SLURM=1
  # headless chromium for the MLflow UI check (tests/test_tracking_ui.py); it skips where none installs
  command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    chromium >/tmp/chromium_apt.log 2>&1 || echo "chromium did not install (/tmp/chromium_apt.log): the browser check skips"
fi
if [ -x scripts/setup_vllm_cpu.sh ]; then
  ./scripts/setup_vllm_cpu.sh
  export RPG_REQUIRE_VLLM_CPU=1
fi
if [ $# -gt 0 ]; then
  exec .venv/bin/pytest -q "$@"
fi
native=$(.venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
if [ "$native" = AVX2 ]; then
  # the scalar set; vLLM's CPU build compiles kernels with torch inductor, whose scalar code does not build
  other=default select=(-m kernels -k "not vllm")
else
  other=avx2 select=(-m kernels)
fi
echo "== the kernel-dependent tests under ATEN_CPU_CAPABILITY=$other (the machine's own set: $native): ${select[*]} =="
ATEN_CPU_CAPABILITY=$other .venv/bin/pytest -q "${select[@]}"
echo "== the whole suite under the machine's own kernel set ($native) =="
exec .venv/bin/pytest -q
