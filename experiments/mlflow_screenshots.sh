#!/usr/bin/env bash
# Screenshots of what a person sees in the MLflow UI after a sweep (docs/mlflow_*.png): the experiment's runs
# list and the compare view of the sweep's trials. Headless Chromium from Debian draws the pages:
#   apt-get install chromium-headless-shell
# Usage (the two paths are what `mae-ray quickstart` prints after http://127.0.0.1:5000/):
#   experiments/mlflow_screenshots.sh sqlite:///$PWD/mlflow.db '#/experiments/1/runs?viewStateShareKey=...' \
#       '#/compare-runs?runs=...' docs/
# (WIDTH=1800 HEIGHT=900 made docs/mlflow_runs.png)
set -euo pipefail
store=$1 runs_path=$2 compare_path=$3 out=${4:-docs}
port=${PORT:-5057}
chrome=$(command -v chromium-headless-shell || command -v chromium || true)
[ -n "$chrome" ] || { echo "error: no headless Chromium: apt-get install chromium-headless-shell" >&2; exit 2; }

# the UI in its own process group, bound to 127.0.0.1, stopped (that group only) on exit
setsid mlflow ui --backend-store-uri "$store" --host 127.0.0.1 --port "$port" > /tmp/mlflow_ui_$port.log 2>&1 &
ui=$!
trap 'kill -- -$ui 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done

shot() {  # URL PNG: the page after its scripts ran (virtual time lets the React app fetch and draw its charts)
  "$chrome" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=${WIDTH:-2400},${HEIGHT:-1500} \
    --virtual-time-budget=${BUDGET_MS:-90000} --screenshot="$2" "$1" 2> /dev/null
}
shot "http://127.0.0.1:$port/$runs_path" "$out/mlflow_runs.png"
shot "http://127.0.0.1:$port/$compare_path" "$out/mlflow_compare.png"
echo "$out/mlflow_runs.png $out/mlflow_compare.png"
