#!/usr/bin/env bash
# Stage 2 of 3: 256px text/image-to-video (lr 1e-5, the stage-1 buckets, t2v / i2v head / tail / loop 1/5/1/1),
# starting from OUT_DIR/stage1's final model:
#   scripts/stage2_256px_ti2v.sh 1 8 meta.csv runs/os2 --tokenizer.path=dcae.safetensors
STAGE_PRESET=stage2_256px_ti2v DEBUG_PRESET=debug_stage2 STAGE_NAME=stage2 PREV_NAME=stage1
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch_stage "$@"
