#!/usr/bin/env bash
# One-command set-up: a .venv in the repository with torch, ColossalAI and cinedit installed.
#
# Usage: bash .ci/setup.sh            (idempotent; re-runs are quick when nothing changed)
#        CINEDIT_VENV=/path bash .ci/setup.sh
#
# Why a script rather than one `pip install`: ColossalAI 0.5.0 pins torch<=2.5.1, transformers==4.51.3
# and diffusers==0.29.0. Resolving those pins would downgrade torch (and pull CUDA wheels on a CPU
# machine), so ColossalAI and lpips (whose torchvision dependency must stay off CPU machines) are
# installed with --no-deps, and their real runtime needs come from pyproject's `colossalai` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CINEDIT_VENV:-.venv}
PY=${PYTHON:-python3}

stamp="$VENV/.cinedit-setup"
want=$(cat pyproject.toml .ci/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import cinedit, torch" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel

# torch first, pinned, so nothing later can swap it. On a CPU machine whose pip config has a local CPU
# wheel in find-links, `torch==2.13.0` takes that (2.13.0+cpu sorts above 2.13.0); elsewhere the
# registry's build. A torch that is already there is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch ${CINEDIT_TORCH:-2.13.0}"
  pip install -q "torch==${CINEDIT_TORCH:-2.13.0}"
fi
torch_req="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"

echo "[setup] installing ColossalAI 0.5.0, lpips and scikit-video without their pinned dependencies"
pip install -q --no-deps "colossalai==0.5.0" "lpips==0.1.4" "scikit-video==1.1.11"

echo "[setup] installing cinedit (editable) with its dependencies"
# The constraint keeps the resolver from replacing the torch installed above.
pip install -q -e ".[dev]" -c <(echo "$torch_req")

"$VENV/bin/python" -c "import cinedit, torch, colossalai; print('[setup] ok: torch', torch.__version__, 'colossalai', colossalai.__version__)"
echo "$want" > "$stamp"
