#!/usr/bin/env bash
# Create .venv and install the pinned requirements (``dev`` adds the test tools). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
want=requirements.txt
[ "${1:-}" = dev ] && want=requirements-dev.txt
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt "$want" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "== installing $want (torch 2.14.1 + torchvision 0.29.1 from PyPI)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$want"
  touch "$stamp"
fi
