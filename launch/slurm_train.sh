#!/usr/bin/env bash
# Multi-node training on Slurm clusters without pdsh or passwordless ssh.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_train.sh --spec launch/specs/openflamingo-3b.yaml [--set k=v ...]
#
# srun starts one task per node; each runs the deepspeed launcher with --no_ssh --node_rank=$SLURM_NODEID, which
# starts that node's ranks locally. Every node needs the repository at the same path (submit from it) and the same
# Python environment; the run dir (run.output_dir) must be on a filesystem every node sees. Variables that the
# pdsh path would read from .deepspeed_env come from the job's environment here (srun exports it to every node).
#SBATCH --job-name=of_ds
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
[ -f launch/train.py ] || { echo "slurm_train.sh: submit from the of_ds repository root" >&2; exit 2; }
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#NODES[@]}" -gt 0 ] || { echo "slurm_train.sh: no nodes in SLURM_JOB_NODELIST" >&2; exit 2; }
MASTER_ADDR="${NODES[0]}"  # the first node of the allocation hosts rank 0 and the rendezvous
HOSTFILE="${HOSTFILE:-$PWD/.slurm_hostfile.$SLURM_JOB_ID}"
printf "%s slots=${GPUS_PER_NODE}\n" "${NODES[@]}" > "$HOSTFILE"
export MASTER_ADDR MASTER_PORT

echo "of_ds: ${SLURM_JOB_NUM_NODES} nodes x ${GPUS_PER_NODE} GPUs, master ${MASTER_ADDR}:${MASTER_PORT}, hostfile ${HOSTFILE}"
# single quotes: SLURM_NODEID must expand on each node, not here
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'exec deepspeed --no_ssh --node_rank="$SLURM_NODEID" \
  --hostfile "$0" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  launch/train.py --deepspeed_config "$1" "${@:2}"' "$HOSTFILE" "$DS_CONFIG" "$@"
