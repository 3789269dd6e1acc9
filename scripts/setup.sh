#!/usr/bin/env bash
# Set up napari-drdm in a virtual environment (idempotent: a second run only checks).
#
#   bash scripts/setup.sh [gui|testing|cli]      (default: gui)
#
# Environment (the older names DRDM_VENV and DRDM_TORCH still work, with a message):
#   NAPARI_DRDM_VENV   virtual environment folder (default: .venv in the repository)
#   NAPARI_DRDM_TORCH  auto | cpu | cuda | skip   (default auto: cuda when `nvidia-smi -L` lists a GPU)
#               cpu  installs torch==2.13.0 (a CPU build lies on this project's machines;
#                    elsewhere pip resolves it from your index: point PIP_INDEX_URL at PyTorch's
#                    CPU wheel index if you want the small CPU-only build)
#               cuda installs the default (CUDA-enabled) torch build for this platform
#   PYTHON      interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-gui}"
for old in DRDM_VENV DRDM_TORCH; do
    new="NAPARI_$old"
    if [ -n "${!old:-}" ] && [ -z "${!new:-}" ]; then
        echo "[setup] $old is deprecated: set $new instead (it is read for now)" >&2
        printf -v "$new" '%s' "${!old}"
    fi
done
venv="${NAPARI_DRDM_VENV:-.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true

if ! python -c "import torch" 2>/dev/null; then
    choice="${NAPARI_DRDM_TORCH:-auto}"
    if [ "$choice" = auto ]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then choice=cuda; else choice=cpu; fi
    fi
    echo "[setup] installing PyTorch ($choice build)"
    case "$choice" in
        cpu)  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true ;;
        cuda) python -m pip install -q "torch>=2.1" 2>&1 | grep -v "^WARNING: Location" || true ;;
        skip) ;;
        *) echo "NAPARI_DRDM_TORCH must be auto, cpu, cuda or skip (got $choice)" >&2; exit 2 ;;
    esac
fi

case "$extra" in
    cli) spec="." ;;
    gui|testing) spec=".[$extra]" ;;
    *) echo "usage: scripts/setup.sh [gui|testing|cli]" >&2; exit 2 ;;
esac
echo "[setup] installing napari-drdm ($spec, editable)"
python -m pip install -q -e "$spec" 2>&1 | grep -v -e "^WARNING: Location" -e "^ *!!" || true
python -c "import napari_drdm, torch; print(f'[setup] napari-drdm {napari_drdm.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
