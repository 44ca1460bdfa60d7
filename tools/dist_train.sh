#!/usr/bin/env bash
# Data-parallel training on one machine: tools/dist_train.sh CONFIG NUM_PROCS [tools/train.py args]
# e.g. tools/dist_train.sh configs/tiny/groma-px_tiny.py 2 --work-dir work_dirs/tiny_ddp
# PYTHON picks the interpreter (default: python on PATH, e.g. the activated venv).
# NNODES, NODE_RANK, MASTER_ADDR and PORT set a multi-node run (one call per node).
set -euo pipefail
CONFIG=$1
NPROCS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROCS" --master_port="$PORT" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
