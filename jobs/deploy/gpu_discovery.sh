#!/usr/bin/env bash
# Spark GPU discovery script: prints the one JSON object Spark reads from stdout,
#   {"name": "gpu", "addresses": ["0", "1"]}
#
# Spark runs it when an executor starts (spark.executor.resource.gpu.discoveryScript), and
# on a standalone worker (spark.worker.resource.gpu.discoveryScript). It must be executable.
#
# - Addresses are nvidia-smi's GPU indices. Set CUDA_DEVICE_ORDER=PCI_BUS_ID in the
#   executors' environment (spark.executorEnv.CUDA_DEVICE_ORDER) so that CUDA numbers the
#   GPUs the same way nvidia-smi does.
# - When CUDA_VISIBLE_DEVICES is set (a resource manager or container restricted this
#   process), only the GPUs it lists are reported; its entries may be indices or full GPU
#   UUIDs. Set but empty means no GPU.
# - No nvidia-smi on PATH, or nvidia-smi finds no device: an empty address list, a note on
#   stderr, exit status 0. An executor that asked for GPUs then fails with Spark's own error,
#   which names the resource and the amount requested.
# - nvidia-smi present but failing (driver not loaded, ...) or printing something that is
#   not an index: its output on stderr, exit status 1 (Spark reports the script failed).
set -euo pipefail

me="gpu_discovery.sh"

emit() {
  local out="" address
  for address in "$@"; do
    out+="${out:+, }\"${address}\""
  done
  printf '{"name": "gpu", "addresses": [%s]}\n' "$out"
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "$me: nvidia-smi is not on PATH; reporting no GPUs" >&2
  emit
  exit 0
fi

status=0
listing=$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader 2>&1) || status=$?
if [[ $status -ne 0 ]]; then
  if [[ "$listing" == *"No devices were found"* ]]; then
    echo "$me: nvidia-smi found no GPU; reporting none" >&2
    emit
    exit 0
  fi
  echo "$me: nvidia-smi failed with exit status $status: $listing" >&2
  exit 1
fi

visible=""
restricted=0
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
  restricted=1
  visible=",${CUDA_VISIBLE_DEVICES// /},"
fi

addresses=()
while IFS=, read -r index uuid; do
  index="${index// /}"
  uuid="${uuid// /}"
  [[ -z "$index" ]] && continue
  if [[ ! "$index" =~ ^[0-9]+$ ]]; then
    echo "$me: unexpected nvidia-smi output line: ${index},${uuid}" >&2
    exit 1
  fi
  if [[ $restricted -eq 0 || "$visible" == *",${index},"* || ( -n "$uuid" && "$visible" == *",${uuid},"* ) ]]; then
    addresses+=("$index")
  fi
done <<<"$listing"

emit ${addresses[@]+"${addresses[@]}"}
