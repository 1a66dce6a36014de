#!/usr/bin/env bash
# Run one training stage on every worker of a Cloud TPU pod slice.
#
#   tools/launch_tpu_pod.sh setup TPU_NAME ZONE              # copy this checkout to all workers, create .venv
#   tools/launch_tpu_pod.sh train TPU_NAME ZONE CONFIG WORKDIR [--config.x.y=... ...]
#
# WORKDIR should be a gs:// path (checkpoints must be visible to every host); TensorBoard events and
# metrics.jsonl of process 0 then go to ./logs/<name> on worker 0. Every worker runs the same command;
# jax.distributed.initialize() discovers the pod by itself (--distributed), and each process reads its
# own shard of every global batch. Set PROJECT to pass --project, REPO_DIR to change the remote folder.
set -euo pipefail

usage() { sed -n '2,11p' "$0"; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
repo_dir=${REPO_DIR:-xemogpt-jax}
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project_flag[@]}" --worker=all --command="$1"; }

case "$action" in
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.venv --exclude=.git --exclude=demo_out -czf /tmp/xemogpt-jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/xemogpt-jax.tgz "$tpu":/tmp/ --zone="$zone" "${project_flag[@]}" --worker=all
    ssh_all "mkdir -p $repo_dir && tar -C $repo_dir -xzf /tmp/xemogpt-jax.tgz && cd $repo_dir && \
      python3 -m venv .venv && .venv/bin/pip install -q -e '.[media,tpu]'"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    extra=""
    [[ $# -gt 0 ]] && extra=$(printf ' %q' "$@")
    ssh_all "cd $repo_dir && .venv/bin/python -m xemogpt_jax.train --config=$config --workdir=$workdir --distributed$extra"
    ;;
  *) usage ;;
esac
