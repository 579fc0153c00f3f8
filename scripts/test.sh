#!/usr/bin/env bash
# One command that sets up a fresh machine and runs the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing Debian chromium for the browser test"
  (apt-get update -q && apt-get install -y -q --no-install-recommends chromium) >/tmp/plugconv-apt.log 2>&1 \
    || echo "chromium install failed (browser test will be skipped): see /tmp/plugconv-apt.log"
fi
. .venv/bin/activate
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 NO_PROXY="127.0.0.1,localhost"
ruff check .
python -m pytest -q "$@"
