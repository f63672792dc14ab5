#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize()
# discovers the pod from the TPU runtime (TPU_WORKER_HOSTNAMES etc).
#
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh --config=configs/paper.py:real \
#       --workdir=gs://bucket/runs/tavlo
#
# First check on any CPU box that the step fits the slice's HBM (no TPU needed;
# pip install 'jax[tpu]==0.10.2' there for libtpu; exit code 3 = does not fit):
#   python -m tavlo_jax.aot_compile --config=configs/paper.py:real --topology=v5e:4x8
#
# Data: build the TFDS records once (any machine), copy to a bucket, and point
# --config.dataset.data_dir at it. Checkpoints go to --workdir (all workers write
# their shards into the same directory).
set -euo pipefail
TPU=${TPU:?name of the TPU VM}; ZONE=${ZONE:?zone}
REPO=${REPO:-~/tavlo_jax}
# Flags: megascale/latency hiding are on by default on TPU. Mesh and dtype come
# from the config (configs/paper.py: bfloat16, fsdp over every chip of the slice);
# multi-slice: add --config.mesh.data=<slices> --config.mesh.fsdp=<chips per slice>.
gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" --worker=all --command="
  cd ${REPO} && . .venv/bin/activate &&
  python -m tavlo_jax.main $* 2>&1 | tee -a ~/tavlo.log"
