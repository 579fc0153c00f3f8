"""``python -m plugconv``: see :mod:`plugconv.cli`."""

from __future__ import annotations

from plugconv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
