#!/usr/bin/env bash
# Set up (first time) and open napari with the DRDM explorer docked.
#   bash scripts/run.sh [files to open...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gui
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ] && [ "$(uname)" = Linux ]; then
    echo "[run] no display found: napari needs one (or run under xvfb-run to try it headless)" >&2
fi
exec .venv/bin/napari -w napari-drdm "DRDM explorer" -- "$@"
