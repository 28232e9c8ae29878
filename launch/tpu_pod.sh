#!/usr/bin/env bash
# Trains misc_jax on a Cloud TPU VM pod slice: creates the slice (or reuses one of that name), copies this
# checkout to every worker, installs it, and starts the main job on all workers at once; each worker is one
# JAX process and jax.distributed finds the others from the TPU metadata (--multihost).
#
#   launch/tpu_pod.sh --name misc-v4-32 --zone us-central2-b --accelerator v4-32 \
#       --config configs/kbcnet_spair.py --workdir gs://BUCKET/runs/spair --data_dir gs://BUCKET/tfds \
#       [--version tpu-ubuntu2204-base] [--spot] [--dry_run] [-- --config.batch_size=64 ...]
#
# --data_dir is TFDS_DATA_DIR on every worker: build the datasets once and copy them there (docs/launch.md).
# Arguments after -- go to misc_jax.main. --dry_run prints the commands instead of running them.
set -euo pipefail

name="" zone="" accelerator="" config="" workdir="" data_dir="" version="tpu-ubuntu2204-base"
spot=0 dry_run=0
extra=()

usage() {
  sed -n '2,11p' "$0" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --data_dir) data_dir="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage ;;
  esac
done
for required in name zone accelerator config workdir data_dir; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_pod.sh: --${required} is required" >&2
    usage
  fi
done
if [[ "$workdir" != gs://* ]]; then
  echo "tpu_pod.sh: --workdir must be a gs:// bucket path that every worker can write" >&2
  exit 2
fi

# Runs a command, or prints it (shell-quoted) with --dry_run.
run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")

if ((dry_run)) || ! "${tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  ((dry_run)) && echo "# if the slice does not exist yet:"
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
  ((spot)) && create+=(--spot)
  run "${create[@]}"
fi

# This checkout (committed files only) to every worker.
archive="/tmp/misc_jax_$$.tar.gz"
run git -C "$(dirname "$0")/.." archive --format=tar.gz --prefix=misc_jax/ -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:misc_jax.tar.gz" "${where[@]}" --worker=all
run rm -f "$archive"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
  "rm -rf misc_jax && tar xzf misc_jax.tar.gz && cd misc_jax && python3 -m pip install -q -e . 'jax[tpu]==0.10.2'"

# printf %q keeps the overrides intact through the remote shell.
overrides=""
if ((${#extra[@]})); then
  overrides="$(printf ' %q' "${extra[@]}")"
fi
job="cd misc_jax && TFDS_DATA_DIR=$(printf '%q' "$data_dir") nohup python3 -m misc_jax.main"
job+=" --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir") --multihost${overrides}"
job+=" > ~/misc_jax.log 2>&1 &"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$job"

cat << EOF
# Follow worker 0 (TensorBoard: tensorboard --logdir $workdir):
${tpu[*]} ssh $name --zone $zone --worker=0 --command 'tail -f ~/misc_jax.log'
# After a preemption, run this script again: the job resumes from the latest checkpoint in $workdir.
# Delete the slice when done:
${tpu[*]} delete $name --zone $zone --quiet
EOF
