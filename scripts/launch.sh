#!/usr/bin/env bash
# Shared by the stage scripts: launch `python -m cinedit.generator.train PRESET ...` on NODES x GPUS processes.
#
#   scripts/stageN_*.sh [--debug] NODES GPUS_PER_NODE META OUT_DIR [--section.field=value ...]
#
# One node: torchrun on this machine. Several nodes: with HOSTFILE=path (one hostname per line, passwordless ssh)
# `colossalai run --hostfile` starts every node from here; without it run the same command on every node with
# NODE_RANK=0..NODES-1 and MASTER_ADDR=<node 0> (SLURM: srun sets both from its own variables, see the README).
# --debug runs the stage's CPU twin (preset debug_stageN): GPUS_PER_NODE processes on the CPU with gloo.
# DRY_RUN=1 prints the launch command without running it.
set -euo pipefail

usage() {
    echo "usage: $0 [--debug] NODES GPUS_PER_NODE META OUT_DIR [--section.field=value ...]" >&2
    echo "  META: data meta file (cinedit data index), or 'cache:DIR' for a 'cinedit data cache' folder" >&2
    echo "  OUT_DIR: the chain's root; this stage writes OUT_DIR/$STAGE_NAME and starts from OUT_DIR/$PREV_NAME" >&2
    exit 2
}

launch_stage() {
    local debug=0
    if [[ "${1:-}" == "--debug" ]]; then debug=1; shift; fi
    [[ $# -ge 4 ]] || usage
    local nodes=$1 gpus=$2 meta=$3 root=$4
    shift 4
    [[ "$nodes" =~ ^[1-9][0-9]*$ && "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "NODES and GPUS_PER_NODE must be positive integers" >&2; usage; }
    local preset=$STAGE_PRESET
    [[ $debug == 1 ]] && preset=$DEBUG_PRESET

    local data_args=()
    if [[ "$meta" == cache:* ]]; then
        data_args=(--data.use_cache=true "--data.cache_dir=${meta#cache:}")
        [[ -f "${meta#cache:}/index.json" ]] || { echo "error: ${meta#cache:} is not a cinedit data cache (no index.json)" >&2; exit 2; }
    else
        [[ -f "$meta" ]] || { echo "error: meta file $meta not found (make one with: cinedit data index VIDEOS --out meta.csv)" >&2; exit 2; }
        data_args=("--data.meta=$meta")
    fi

    local init_args=()
    if [[ -n "$PREV_NAME" ]]; then
        local prev="$root/$PREV_NAME/model/generator"
        if [[ ! -f "$prev/config.json" ]]; then
            echo "error: $STAGE_NAME starts from the previous stage's final model, $prev, which does not exist:" >&2
            echo "       run the previous stage script first (or pass --model.init_from=... after OUT_DIR)" >&2
            exit 2
        fi
        init_args=("--model.init_from=$prev")
    fi

    local here python
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    python=${PYTHON:-}
    if [[ -z "$python" ]]; then
        if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python; fi
    fi
    local train_args=("$preset" "${data_args[@]}" "${init_args[@]}" "--train.out_dir=$root/$STAGE_NAME" --train.resume=auto "$@")
    local port=${MASTER_PORT:-29500}
    local cmd
    if [[ $nodes -gt 1 && -n "${HOSTFILE:-}" ]]; then
        local colossal
        colossal=$(dirname "$python")/colossalai
        [[ -x "$colossal" ]] || colossal=colossalai
        cmd=("$colossal" run --nproc_per_node "$gpus" --hostfile "$HOSTFILE" --num_nodes "$nodes"
             --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0 with HOSTFILE}" --master_port "$port"
             -m cinedit.generator.train "${train_args[@]}")
    else
        cmd=("$python" -m torch.distributed.run --nnodes "$nodes" --node-rank "${NODE_RANK:-0}"
             --nproc-per-node "$gpus" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$port"
             -m cinedit.generator.train "${train_args[@]}")
    fi
    if [[ $debug == 1 ]]; then
        export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    echo "+ ${cmd[*]}" >&2
    [[ "${DRY_RUN:-0}" == 1 ]] && exit 0  # print the launch command only
    exec "${cmd[@]}"
}
