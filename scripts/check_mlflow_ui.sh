#!/usr/bin/env bash
# Checks in a headless browser that the MLflow web UI shows the project's runs as the README says: the link
# the tracker gives (MLflowTracker.ui_link; rpg.tracking.ui.runs_url) opens the experiment's runs in the
# model-training view, with the run, its source and user and metric columns. As a control, the same
# experiment opened without the link's parameters must show MLflow's GenAI view (so the check can tell
# the two views apart).
#
#   scripts/check_mlflow_ui.sh        # exit 0: as documented, 1: not, 77: no chromium here
#
# Needs chromium (Debian: apt-get install -y chromium; or CHROMIUM=/path/to/chrome). It starts a tracking
# server (rpg.tracking.server) on a free port over a temporary store, logs one run through rpg.tracking.tracker,
# opens the pages and removes everything it made. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CHROME=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$CHROME" ]; then
  echo "no chromium: install it (apt-get install -y chromium) or set CHROMIUM" >&2
  exit 77
fi
sandbox=()
[ "$(id -u)" = 0 ] && sandbox=(--no-sandbox)  # chromium refuses to run as root with its sandbox

tmp=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

port=$("$PY" -c "from rpg.tracking.server import free_port; print(free_port())")
"$PY" -m rpg.tracking.server --port "$port" --backend-store-uri "sqlite:///$tmp/mlflow.db" \
  --address-file "$tmp/address" >"$tmp/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do
  [ -s "$tmp/address" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
  sleep 1
done
url=$(cat "$tmp/address")

# one run as training logs it: run tags from rpg.tracking.ui, metrics through the tracker's sender
"$PY" - "$url" "$tmp" >"$tmp/run.log" <<'EOF'
import sys
from omegaconf import OmegaConf
from rpg.tracking.tracker import MLflowTracker
from rpg.tracking.ui import run_tags

url, tmp = sys.argv[1:]
cfg = OmegaConf.create({"name": None, "algo": {"name": "grpo"}, "model": {"name": "tiny"},
                        "data": {"name": "toy"}, "seed": 1, "steps": 2, "sweep": "ui_check"})
tracker = MLflowTracker(url, output_dir=tmp)
tracker.start("ui_check", "ui-check-run", {"algo": {"name": "grpo"}}, run_tags(cfg, "unknown", False))
for step in (1, 2):
    tracker.log_metrics({"train/acc": 0.125 * step, "kl/k3": 0.0625, "eval/toy/greedy_acc": 0.75}, step)
tracker.end()
open(f"{tmp}/link", "w").write(tracker.ui_link)
EOF
link=$(cat "$tmp/link")
echo "link: $link"

page() {  # page URL NAME BUDGET_MS: the page's text once its scripts ran (a fresh profile: no remembered view)
  "$CHROME" --headless --disable-gpu --disable-dev-shm-usage "${sandbox[@]}" --window-size=2400,1400 \
    --user-data-dir="$tmp/profile-$2-$3" --virtual-time-budget="$3" --dump-dom "$1" 2>/dev/null |
    "$PY" -c 'import html, re, sys
s = re.sub(r"<(script|style)\b.*?</\1>", " ", sys.stdin.read(), flags=re.S)
print(re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", s))))'
}

check() {  # check URL NAME WANTED... : every word wanted (!word: absent) is on the page; a slow load is retried
  local url=$1 name=$2 budget text missing
  shift 2
  for budget in 20000 60000; do
    text=$(page "$url" "$name" "$budget")
    missing=()
    for want in "$@"; do
      if [ "${want:0:1}" = "!" ]; then
        [[ "$text" == *"${want:1}"* ]] && missing+=("$want")
      else
        [[ "$text" == *"$want"* ]] || missing+=("$want")
      fi
    done
    [ ${#missing[@]} = 0 ] && { echo "ok: $name"; return 0; }
  done
  echo "FAILED: $name: not as wanted (!word: must be absent): ${missing[*]}; the page: ${text:0:1500}" >&2
  return 1
}

status=0
# the training view: its sidebar (Model registry), the run, its source and user, metric columns and values
check "$link" "the link opens the runs in the model-training view" \
  "Model registry" "ui-check-run" "rpg.train.loop" "$(whoami)" "train/acc" "eval/toy/greedy_acc" "0.25" "0.75" \
  "!Observability" || status=1
experiment=$(sed -E 's|.*#/experiments/([^/?]+).*|\1|' <<<"$link")
check "$url/#/experiments/$experiment" "control: without the link's parameters MLflow shows its GenAI view" \
  "Observability" "!ui-check-run" || status=1
exit $status
