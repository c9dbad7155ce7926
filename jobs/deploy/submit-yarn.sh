#!/usr/bin/env bash
# The pipeline on YARN, one spark-submit per stage, each sized for its work:
#   ETL on CPU executors under dynamic allocation, training on a fixed set of GPU executors
#   (barrier stages need one), evaluation on a small application.
#
#   jobs/deploy/submit-yarn.sh CONFIG.yaml      run from the repository root
#
# Needs HADOOP_CONF_DIR (or YARN_CONF_DIR) pointing at the cluster's configuration, the
# environment archive from jobs/deploy/pack_env.sh, and a config whose paths are cluster
# URIs (see jobs/deploy/cluster.yaml). Cluster deploy mode: the driver runs in YARN too, so
# the config travels with --files and is named by its base name.
set -euo pipefail

CONFIG=${1:?usage: jobs/deploy/submit-yarn.sh CONFIG.yaml}
NAME=$(basename "$CONFIG")
ENV_ARCHIVE=${ENV_ARCHIVE:-spark-train-env.tar.gz}
QUEUE=${QUEUE:-default}

spark-submit \
  --master yarn \
  --deploy-mode cluster \
  --queue "$QUEUE" \
  --name spark-train-etl \
  --properties-file jobs/deploy/spark-defaults.etl.conf \
  --archives "$ENV_ARCHIVE#environment" \
  --files "$CONFIG" \
  --conf spark.pyspark.python=./environment/bin/python \
  jobs/etl.py --config "$NAME"

spark-submit \
  --master yarn \
  --deploy-mode cluster \
  --queue "$QUEUE" \
  --name spark-train-train \
  --properties-file jobs/deploy/spark-defaults.train-yarn-gpu.conf \
  --archives "$ENV_ARCHIVE#environment" \
  --files "$CONFIG,jobs/deploy/gpu_discovery.sh" \
  --conf spark.pyspark.python=./environment/bin/python \
  --conf spark.executor.instances=4 \
  jobs/train.py --config "$NAME" --set train.num_workers=4

spark-submit \
  --master yarn \
  --deploy-mode cluster \
  --queue "$QUEUE" \
  --name spark-train-evaluate \
  --archives "$ENV_ARCHIVE#environment" \
  --files "$CONFIG" \
  --conf spark.pyspark.python=./environment/bin/python \
  --conf spark.dynamicAllocation.enabled=false \
  --conf spark.executor.instances=1 \
  jobs/evaluate.py --config "$NAME" --split test
