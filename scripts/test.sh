#!/usr/bin/env bash
# Set up everything on a fresh machine (venv, packages, Xvfb), lint with ruff and run the test suite.
#   bash scripts/test.sh [extra pytest args]      e.g. -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_xvfb.sh
bash scripts/setup.sh testing
echo "[test] ruff check"
.venv/bin/python -m ruff check --no-cache .
export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-xcb}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
