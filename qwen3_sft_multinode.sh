#!/usr/bin/env bash
# Several nodes: run this once on every node, with the same flags; only NODE_RANK differs.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash qwen3_sft_multinode.sh [train.py flags...]    # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash qwen3_sft_multinode.sh [train.py flags...]    # on node 1
# Environment:
#   NNODES, NODE_RANK, MASTER_ADDR    required: node count, this node's rank (0..NNODES-1), node 0's address
#   MASTER_PORT=29500                 rendezvous port on node 0
#   GPUS_PER_NODE=N                   default: the GPUs nvidia-smi lists here
#   BACKEND=fsdp|zero3|<config.yaml>  config/accelerate/fsdp2.yaml (default), config/accelerate/zero3.yaml, or a path
#   RECIPE=config/recipes/tiny.yaml   the recipe of flags; flags on the command line win
#   GLOBAL_BATCH=N                    sequences (packed rows with --packing) per optimizer step: sets
#                                     --gradient_accumulation_steps = N / (per_device_train_batch_size x world size)
#   DRY_RUN=1                         print the global batch and the command, run nothing
# The global batch is per_device_train_batch_size x gradient_accumulation_steps x NNODES x GPUS_PER_NODE; it is
# printed before launch. qwen3_sft.sh runs this script with NNODES=1 when a node has several GPUs.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

for var in NNODES NODE_RANK MASTER_ADDR; do
  [[ -n "${!var:-}" ]] || die "$var is not set. Run on every node: NNODES=<nodes> NODE_RANK=<0..NNODES-1> MASTER_ADDR=<node 0's address> bash $0 [train.py flags]"
done
MASTER_PORT=${MASTER_PORT:-29500}
is_int "$NNODES" && (( NNODES >= 1 )) || die "NNODES=$NNODES: a node count >= 1"
is_int "$NODE_RANK" && (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK: an integer in 0..$((NNODES - 1))"
is_int "$MASTER_PORT" || die "MASTER_PORT=$MASTER_PORT: a port number"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$( (command -v nvidia-smi >/dev/null && nvidia-smi --list-gpus 2>/dev/null | wc -l) || echo 0)
fi
is_int "$GPUS_PER_NODE" && (( GPUS_PER_NODE >= 1 )) || die "GPUS_PER_NODE=$GPUS_PER_NODE: no GPU found here; set GPUS_PER_NODE"
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

RECIPE=${RECIPE:-config/recipes/tiny.yaml}
[[ -f "$RECIPE" ]] || die "RECIPE=$RECIPE: no such recipe file (see config/recipes/)"
BACKEND=${BACKEND:-fsdp}
case "$BACKEND" in
  fsdp)  ACCELERATE_CONFIG=config/accelerate/fsdp2.yaml ;;
  zero3) ACCELERATE_CONFIG=config/accelerate/zero3.yaml ;;
  *)     ACCELERATE_CONFIG=$BACKEND ;;
esac
[[ -f "$ACCELERATE_CONFIG" ]] || die "BACKEND=$BACKEND: no accelerate config at $ACCELERATE_CONFIG; use fsdp, zero3 or a config path"

# per_device_train_batch_size and gradient_accumulation_steps as train.py will see them (recipe, then flags, then the
# TrainingArguments defaults): read by the same recipe parser, so nothing is restated here.
read -r PER_DEVICE GRAD_ACCUM < <(python - "$RECIPE" "$@" <<'PY'
import argparse, sys
from sft.arguments import recipe_to_flags
from transformers import TrainingArguments
defaults = TrainingArguments.__dataclass_fields__
parser = argparse.ArgumentParser(add_help=False)
for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
    parser.add_argument(f"--{name}", type=int, default=defaults[name].default)
known, _ = parser.parse_known_args(recipe_to_flags(sys.argv[1]) + sys.argv[2:])
print(known.per_device_train_batch_size, known.gradient_accumulation_steps)
PY
)
[[ -n "${PER_DEVICE:-}" && -n "${GRAD_ACCUM:-}" ]] || die "could not read the batch flags from $RECIPE and the command line"

EXTRA=()
if [[ -n "${GLOBAL_BATCH:-}" ]]; then
  is_int "$GLOBAL_BATCH" && (( GLOBAL_BATCH >= 1 )) || die "GLOBAL_BATCH=$GLOBAL_BATCH: a positive integer"
  PER_STEP=$((PER_DEVICE * WORLD_SIZE))
  (( GLOBAL_BATCH % PER_STEP == 0 )) || die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of per_device_train_batch_size x world size = $PER_DEVICE x $WORLD_SIZE = $PER_STEP; choose a multiple of $PER_STEP"
  GRAD_ACCUM=$((GLOBAL_BATCH / PER_STEP))
  EXTRA=(--gradient_accumulation_steps "$GRAD_ACCUM")
fi
echo "global batch = per_device_train_batch_size $PER_DEVICE x gradient_accumulation_steps $GRAD_ACCUM x world size $WORLD_SIZE ($NNODES nodes x $GPUS_PER_NODE GPUs) = $((PER_DEVICE * GRAD_ACCUM * WORLD_SIZE)) sequences per step"

# NVLink SHARP (NVLS) multicast off by default: it fails or hangs on machines that lend GPUs without multicast support.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
CMD=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_machines "$NNODES" --machine_rank "$NODE_RANK"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --num_processes "$WORLD_SIZE"
     train.py --config "$RECIPE" "$@" "${EXTRA[@]}")
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; then
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE ${CMD[*]}"
  exit 0
fi
exec "${CMD[@]}"
