#!/usr/bin/env bash
# Create .venv and install rpg (torch first and exactly: a range would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
