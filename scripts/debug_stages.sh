#!/usr/bin/env bash
# The three-stage chain on the CPU in minutes, through the same stage scripts, presets debug_stage1..3:
# 64px t2v -> 64px t/i2v -> 128px t/i2v with context parallelism 2 (ring attention) and every block checkpointed,
# each stage starting from the previous one's final model. PROCS processes (default 2) on gloo.
#   scripts/debug_stages.sh runs/debug_chain [META] [--section.field=value ...]
# Without META it builds the sample dataset into OUT_DIR/sample_data first.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 OUT_DIR [META] [--section.field=value ...]" >&2; exit 2; }
root=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
meta=""
if [[ $# -ge 1 && "$1" != --* ]]; then meta=$1; shift; fi
if [[ -z "$meta" ]]; then
    meta="$root/sample_data/meta.csv"
    if [[ ! -f "$meta" ]]; then
        python=${PYTHON:-}
        [[ -n "$python" ]] || { [[ -x "$here/../.venv/bin/python" ]] && python="$here/../.venv/bin/python" || python=python; }
        "$python" -m cinedit.cli data sample --out "$root/sample_data"
    fi
fi
procs=${PROCS:-2}
"$here/stage1_256px_t2v.sh" --debug 1 "$procs" "$meta" "$root" "$@"
"$here/stage2_256px_ti2v.sh" --debug 1 "$procs" "$meta" "$root" "$@"
"$here/stage3_768px_ti2v.sh" --debug 1 "$procs" "$meta" "$root" "$@"
echo "debug chain done: $root/stage3/model (cinedit generator sample --ckpt $root/stage3/model ...)"
