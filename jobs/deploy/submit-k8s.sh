#!/usr/bin/env bash
# The pipeline on Kubernetes, one spark-submit per stage (cluster deploy mode). The image
# built from jobs/deploy/Dockerfile holds the project under /opt/spark-train, its Python
# environment and the GPU discovery script, so the jobs are local:// paths in the image.
#
#   K8S_API_SERVER=https://host:6443 IMAGE=registry/spark-train:0.1.0 \
#     jobs/deploy/submit-k8s.sh /opt/spark-train/jobs/deploy/cluster.yaml
#
# CONFIG is a path inside the image (or mount one with a ConfigMap). Paths in it must be
# URIs every pod reaches (s3://…, see jobs/deploy/README.md).
set -euo pipefail

CONFIG=${1:?usage: jobs/deploy/submit-k8s.sh CONFIG_PATH_IN_IMAGE}
MASTER="k8s://${K8S_API_SERVER:?set K8S_API_SERVER, e.g. https://10.0.0.1:6443}"
IMAGE=${IMAGE:?set IMAGE to the image built from jobs/deploy/Dockerfile}
NAMESPACE=${NAMESPACE:-spark-train}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-spark}

spark-submit \
  --master "$MASTER" \
  --deploy-mode cluster \
  --name spark-train-etl \
  --properties-file jobs/deploy/spark-defaults.etl.conf \
  --conf spark.kubernetes.namespace="$NAMESPACE" \
  --conf spark.kubernetes.container.image="$IMAGE" \
  --conf spark.kubernetes.authenticate.driver.serviceAccountName="$SERVICE_ACCOUNT" \
  --conf spark.pyspark.python=/opt/spark-train/venv/bin/python \
  local:///opt/spark-train/jobs/etl.py --config "$CONFIG"

spark-submit \
  --master "$MASTER" \
  --deploy-mode cluster \
  --name spark-train-train \
  --properties-file jobs/deploy/spark-defaults.train-k8s-gpu.conf \
  --conf spark.kubernetes.namespace="$NAMESPACE" \
  --conf spark.kubernetes.container.image="$IMAGE" \
  --conf spark.kubernetes.authenticate.driver.serviceAccountName="$SERVICE_ACCOUNT" \
  --conf spark.kubernetes.executor.podTemplateFile=jobs/deploy/k8s-executor-gpu.yaml \
  --conf spark.executor.instances=4 \
  local:///opt/spark-train/jobs/train.py --config "$CONFIG" --set train.num_workers=4

spark-submit \
  --master "$MASTER" \
  --deploy-mode cluster \
  --name spark-train-evaluate \
  --conf spark.kubernetes.namespace="$NAMESPACE" \
  --conf spark.kubernetes.container.image="$IMAGE" \
  --conf spark.kubernetes.authenticate.driver.serviceAccountName="$SERVICE_ACCOUNT" \
  --conf spark.pyspark.python=/opt/spark-train/venv/bin/python \
  --conf spark.executor.instances=1 \
  local:///opt/spark-train/jobs/evaluate.py --config "$CONFIG" --split test
