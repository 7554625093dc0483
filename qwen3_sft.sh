#!/usr/bin/env bash
# One-node launcher. With no arguments: the bundled default (tiny preset, bundled data), on a CPU or the GPUs here.
#   bash qwen3_sft.sh [train.py flags...]          flags pass through to train.py and override the recipe
#   BACKEND=zero3 bash qwen3_sft.sh ...            DeepSpeed ZeRO-3 instead of FSDP2 on several GPUs
# Environment:
#   RECIPE=config/recipes/tiny.yaml   the recipe of flags (config/recipes/); flags on the command line win
#   BACKEND=fsdp|zero3|<config.yaml>  distributed backend when several GPUs are used (default fsdp: FSDP2); set on
#                                     one GPU, it runs there too (one process), e.g. to train with ZeRO-3 offload
#   NUM_GPUS=N                        GPUs to use (default: all that nvidia-smi lists; 0 on a CPU machine)
#   GLOBAL_BATCH=N, MASTER_PORT, DRY_RUN=1   as in qwen3_sft_multinode.sh, which this script runs with NNODES=1
set -euo pipefail
cd "$(dirname "$0")"

RECIPE=${RECIPE:-config/recipes/tiny.yaml}
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$( (command -v nvidia-smi >/dev/null && nvidia-smi --list-gpus 2>/dev/null | wc -l) || echo 0)
fi
[[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || { echo "error: NUM_GPUS=$NUM_GPUS: a GPU count" >&2; exit 2; }

if (( NUM_GPUS == 0 )) || { (( NUM_GPUS == 1 )) && [[ -z "${BACKEND:-}" ]]; }; then
  if [[ -n "${GLOBAL_BATCH:-}" ]]; then
    echo "error: GLOBAL_BATCH is for several GPUs; on one device set --gradient_accumulation_steps" >&2; exit 2
  fi
  if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; then
    echo "python train.py --config $RECIPE $*"; exit 0
  fi
  exec python train.py --config "$RECIPE" "$@"
fi

export RECIPE
NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=$NUM_GPUS exec bash qwen3_sft_multinode.sh "$@"
