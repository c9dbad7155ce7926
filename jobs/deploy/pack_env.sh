#!/usr/bin/env bash
# Build the relocatable Python environment that YARN executors unpack (--archives):
# a fresh venv with the project installed (not editable: venv-pack refuses editable
# installs), packed with venv-pack.
#
#   jobs/deploy/pack_env.sh [OUTPUT]            run from the repository root
#   PYTHON=/usr/bin/python3.11 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 \
#     jobs/deploy/pack_env.sh spark-train-env.tar.gz
#
# venv-pack does not copy the interpreter: the unpacked venv runs the base Python at the
# path it had here, so every node needs that Python at that path (pass --python-prefix to
# venv-pack when the nodes keep it elsewhere, or use conda-pack, which bundles Python).
set -euo pipefail

OUT=${1:-spark-train-env.tar.gz}
PYTHON=${PYTHON:-python3.11}
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT

"$PYTHON" -m venv "$BUILD/env"
"$BUILD/env/bin/python" -m pip install --quiet --upgrade pip
# The torch build must match the nodes' CUDA driver; TORCH_INDEX_URL selects the wheel index.
"$BUILD/env/bin/python" -m pip install --quiet \
  ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} .
"$PYTHON" -m venv "$BUILD/tools"
"$BUILD/tools/bin/python" -m pip install --quiet venv-pack
"$BUILD/tools/bin/venv-pack" --prefix "$BUILD/env" --output "$OUT" --force
echo "packed $OUT: ship it with --archives $OUT#environment --conf spark.pyspark.python=./environment/bin/python"
