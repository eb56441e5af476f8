#!/usr/bin/env bash
# Stage 1 of 3: 256px text-to-video (DESIGN.md buckets, lr 5e-5, ZeRO-2, bf16). Needs the tokenizer:
#   scripts/stage1_256px_t2v.sh 1 8 meta.csv runs/os2 --tokenizer.path=dcae.safetensors
# Writes OUT_DIR/stage1; re-running continues it from its latest checkpoint.
STAGE_PRESET=stage1_256px_t2v DEBUG_PRESET=debug_stage1 STAGE_NAME=stage1 PREV_NAME=""
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch_stage "$@"
