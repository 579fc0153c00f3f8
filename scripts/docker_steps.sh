#!/usr/bin/env bash
# Run the Dockerfile's steps outside Docker (there is no Docker engine on the dev machine):
#   1. pip install the same requirements.txt into a venv (skip with --no-install)
#   2. the same weight prefetch command (python -m plugconv.prefetch) into $TORCH_HOME; offline it
#      prints the clear message and goes on, unless --strict (then exit 1)
#   3. the same start command (python app.py) with the image's environment, then the same
#      HEALTHCHECK probe (python urllib, no curl) until it answers or --timeout passes; then stop.
# Usage: bash scripts/docker_steps.sh [--strict] [--no-install] [--port N] [--timeout S] [--venv DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
strict=0 install=1 port=7860 timeout=300 venv=.venv
while [ $# -gt 0 ]; do
  case "$1" in
    --strict) strict=1 ;;
    --no-install) install=0 ;;
    --port) port="$2"; shift ;;
    --timeout) timeout="$2"; shift ;;
    --venv) venv="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
py="$venv/bin/python"
[ -x "$py" ] || { python3 -m venv "$venv"; }

# the image's environment (Dockerfile ENV), with a private TORCH_HOME and temp dirs; outside a
# container the server binds to 127.0.0.1 (the image uses 0.0.0.0)
work=$(mktemp -d -t plugconv-docker-steps.XXXXXX)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  TORCH_HOME="${TORCH_HOME:-$work/torch}" GRADIO_SERVER_NAME=127.0.0.1 GRADIO_SERVER_PORT="$port" \
  GRADIO_ANALYTICS_ENABLED=False GRADIO_TEMP_DIR="$work/gradio" GRADIO_EXAMPLES_CACHE="$work/gradio-examples" \
  MPLCONFIGDIR="$work/matplotlib" HF_HUB_OFFLINE=1 NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then kill "$server"; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== step 1: pip install -r requirements.txt"
if [ "$install" = 1 ]; then
  "$py" -m pip install -q -r requirements.txt
else
  echo "(skipped: --no-install)"
fi

echo "== step 2: python -m plugconv.prefetch (TORCH_HOME=$TORCH_HOME)"
if "$py" -m plugconv.prefetch; then
  echo "prefetch: ok"
elif [ "$strict" = 1 ]; then
  echo "prefetch failed (see above) and --strict is set" >&2
  exit 1
else
  echo "prefetch failed (see above); continuing: the app starts on the bundled offline model"
fi

echo "== step 3: python app.py, then the HEALTHCHECK probe on port $port"
"$py" app.py >"$work/app.log" 2>&1 &
server=$!
deadline=$(( $(date +%s) + timeout ))
until "$py" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=4)" 2>/dev/null; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "app exited before answering; its log:" >&2; cat "$work/app.log" >&2; exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "no answer on port $port within ${timeout}s; app log:" >&2; cat "$work/app.log" >&2; exit 1
  fi
  sleep 2
done
echo "healthy: http://127.0.0.1:$port/ answers"
