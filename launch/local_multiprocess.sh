#!/usr/bin/env bash
# N JAX processes on this machine, each with D fake CPU devices, talking over
# 127.0.0.1 (gloo collectives). Exercises exactly the multi-host code paths
# (jax.distributed, per-process data shards, Orbax multi-process saves).
#
#   launch/local_multiprocess.sh 2 4 --config=configs/avatar_synth.py:runlocal --workdir=workdirs/mp
#
# Logs: <workdir>/process_<i>.log. Exits non-zero if any process fails.
set -euo pipefail
NPROC=${1:?number of processes}; NDEV=${2:?fake devices per process}; shift 2
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
WORKDIR=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -1)
mkdir -p "${WORKDIR:-.}"
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${NDEV}" \
    python3 -m tavlo_jax.main "$@" \
      --coordinator_address="127.0.0.1:${PORT}" --num_processes="${NPROC}" --process_id="${i}" \
      >"${WORKDIR:-.}/process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process ${i} failed; see ${WORKDIR:-.}/process_${i}.log" >&2
    status=1
  fi
done
exit "${status}"
