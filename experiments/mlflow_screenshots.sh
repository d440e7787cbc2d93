#!/usr/bin/env bash
# Screenshots of what a person sees in the MLflow UI after a sweep (docs/mlflow_*.png): the two links a sweep
# prints, its runs view (docs/mlflow_runs.png) and its chart of both accuracies against what it varies
# (docs/mlflow_chart.png). Headless Chromium from Debian draws the pages (tests/test_ui_browser.py reads the
# same pages' text):
#   apt-get install chromium-headless-shell      (or chromium)
# Usage, in the folder where the quickstart ran (the two paths are what it prints after http://127.0.0.1:5000/):
#   experiments/mlflow_screenshots.sh sqlite:///$PWD/mlflow.db '#/experiments/1/runs?viewStateShareKey=...' \
#       '#/experiments/1/runs/RUN/artifactPath/report/accuracy_vs_model_mask_ratio.png?...' docs/
# (the README's pictures: WIDTH=1800 HEIGHT=1000)
set -euo pipefail
store=$1 runs_path=$2 chart_path=$3 out=${4:-docs}
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
shot "http://127.0.0.1:$port/$chart_path" "$out/mlflow_chart.png"
echo "$out/mlflow_runs.png $out/mlflow_chart.png"
