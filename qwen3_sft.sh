#!/usr/bin/env bash
# One-node launcher. With no arguments: the bundled default (tiny preset, bundled data), on a CPU or the GPUs here.
#   bash qwen3_sft.sh [train.py flags...]          flags pass through to train.py and override the recipe
# Environment:
#   RECIPE=config/recipes/tiny.yaml   the recipe of flags (config/recipes/); flags on the command line win
#   BACKEND=fsdp|zero3|<config.yaml>  distributed backend when several GPUs are used (default fsdp)
#   NUM_GPUS=N                        GPUs to use (default: all that nvidia-smi lists; 0 on a CPU machine)
set -euo pipefail
cd "$(dirname "$0")"

RECIPE=${RECIPE:-config/recipes/tiny.yaml}
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$( (command -v nvidia-smi >/dev/null && nvidia-smi --list-gpus 2>/dev/null | wc -l) || echo 0)
fi

if (( NUM_GPUS <= 1 )); then
  exec python train.py --config "$RECIPE" "$@"
fi

BACKEND=${BACKEND:-fsdp}
case "$BACKEND" in
  fsdp)  ACCELERATE_CONFIG=config/accelerate/fsdp2.yaml ;;
  zero3) ACCELERATE_CONFIG=config/accelerate/zero3.yaml ;;
  *)     ACCELERATE_CONFIG=$BACKEND ;;
esac
if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
  echo "error: BACKEND=$BACKEND: no accelerate config at $ACCELERATE_CONFIG; use fsdp, zero3 or a config path" >&2
  exit 2
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
  train.py --config "$RECIPE" "$@"
