#!/usr/bin/env bash
# Training on one machine with several GPUs.
#
#   launch/gpu_local.sh --config configs/kbcnet_spair.py --workdir runs/spair [--per_gpu] [--dry_run] \
#       [-- --config.batch_size=32 ...]
#
# Default: one process drives every visible GPU (one jit step over the mesh). --per_gpu: one process per GPU, joined by
# jax.distributed over loopback (what a multi-node run does, on one machine). Arguments after -- go to
# misc_jax.main; --dry_run prints the commands. Ctrl-C (or SIGTERM) checkpoints and stops every process.
set -euo pipefail

config="" workdir="" per_gpu=0 dry_run=0 port="${PORT:-12355}"
extra=()
usage() {
  sed -n '2,9p' "$0" >&2
  exit 2
}
while (($#)); do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --per_gpu) per_gpu=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_local.sh: unknown argument $1" >&2; usage ;;
  esac
done
if [[ -z "$config" || -z "$workdir" ]]; then
  usage
fi
main=(python -m misc_jax.main --config "$config" --workdir "$workdir")

show() {
  printf '%q ' "$@"
  printf '\n'
}

if ((!per_gpu)); then
  if ((dry_run)); then show "${main[@]}" "${extra[@]}"; else exec "${main[@]}" "${extra[@]}"; fi
  exit 0
fi

num_gpus="${NUM_GPUS:-$( (nvidia-smi -L 2> /dev/null || true) | grep -c '^GPU')}"
if ((num_gpus < 1)); then
  echo "gpu_local.sh: no GPU found (nvidia-smi -L); set NUM_GPUS to override" >&2
  exit 1
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2> /dev/null || true' INT TERM
for ((i = 0; i < num_gpus; i++)); do
  proc=(env CUDA_VISIBLE_DEVICES="$i" "${main[@]}" --coordinator_address "localhost:$port"
        --num_processes "$num_gpus" --process_id "$i" "${extra[@]}")
  if ((dry_run)); then
    show "${proc[@]}"
  else
    "${proc[@]}" &
    pids+=($!)
  fi
done
if ((!dry_run)); then
  wait "${pids[@]}"
fi
