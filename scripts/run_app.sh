#!/usr/bin/env bash
# One command that sets up a fresh machine and runs the app (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app.py "$@"
