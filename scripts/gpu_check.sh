#!/usr/bin/env bash
# GPU check (issue 14, part 1): run from the repo root on the GPU machine, e.g. through the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540)
# Installs carried wheels (no network there), maps `cinedit` onto the checkout (no install), runs
# scripts/gpu_check.py and leaves $OUT/gpu_check.json and $OUT/gpu_check.log. Extra arguments go to gpu_check.py
# (e.g. --sections matmul,mmdit_train). See scripts/gpu_check.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

site=/tmp/gpu_check_site
for dir in ${WHEELS:-} scripts/wheels .gpu/wheels .whl; do
  if [ -d "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then
    echo "installing wheels from $dir: $(cd "$dir" && ls *.whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$dir"/*.whl \
      || echo "wheel install from $dir failed; sections needing them will be skipped"
    break
  fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$site" ] && export PYTHONPATH="$PYTHONPATH:$site"

fixtures=${FIXTURES:-}
if [ -z "$fixtures" ]; then
  for dir in .gpu/fixtures shared/fixtures ../shared/fixtures; do
    if [ -d "$dir" ]; then fixtures=$dir; break; fi
  done
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/nvidia-smi.txt"
set -o pipefail
timeout 460 "$PY" scripts/gpu_check.py --out "$OUT" ${fixtures:+--fixtures "$fixtures"} "$@" 2>&1 | tee "$OUT/gpu_check.log"
