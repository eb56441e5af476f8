#!/usr/bin/env bash
# Stage 3 of 3: 768px text/image-to-video (lr 5e-5, context parallelism 4 with ring attention, every block
# checkpointed), starting from OUT_DIR/stage2's final model. GPUS_PER_NODE x NODES must be a multiple of 4:
#   scripts/stage3_768px_ti2v.sh 4 8 meta.csv runs/os2 --tokenizer.path=dcae.safetensors
STAGE_PRESET=stage3_768px_ti2v DEBUG_PRESET=debug_stage3 STAGE_NAME=stage3 PREV_NAME=stage2
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch_stage "$@"
