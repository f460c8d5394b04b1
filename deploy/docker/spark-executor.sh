#!/bin/bash
# The command of the Spark executor pods that a build's driver starts on Kubernetes
# (deploy/k8s/components/spark-build: the executors' pod template names it). Spark appends the
# argument `executor` and passes everything else as environment variables. Spark's own images
# start the executor from their entrypoint; the build image's entrypoint is `recsys`, so this
# starts the executor JVM instead, from the jars of the pip-installed PySpark: driver and
# executors run one image, hence the same `training` code for the Python functions the driver
# ships (Swing's per-item rows).
set -euo pipefail

if [[ "${1:-}" != executor ]]; then
  echo "spark-executor.sh: the first argument must be 'executor' (Spark's executor pod), got '${1:-}'" >&2
  exit 2
fi
for name in SPARK_DRIVER_URL SPARK_EXECUTOR_ID SPARK_EXECUTOR_CORES SPARK_EXECUTOR_MEMORY \
  SPARK_APPLICATION_ID SPARK_EXECUTOR_POD_IP SPARK_EXECUTOR_POD_NAME SPARK_RESOURCE_PROFILE_ID; do
  if [[ -z "${!name:-}" ]]; then
    echo "spark-executor.sh: $name is not set (the Spark driver sets it on its executor pods)" >&2
    exit 2
  fi
done

spark_home=${SPARK_HOME:-$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')}

# SPARK_JAVA_OPT_0, _1, ... are the JVM options the driver hands over (Java 17's module opens,
# the settings an executor needs before it can reach the driver); their order is their index.
java_options=()
while IFS= read -r index; do
  name="SPARK_JAVA_OPT_${index}"
  java_options+=("${!name}")
done < <(compgen -e | sed -n 's/^SPARK_JAVA_OPT_\([0-9][0-9]*\)$/\1/p' | sort -n)

classpath="${spark_home}/jars/*"
# The driver mounts its executor settings (log4j2) at SPARK_CONF_DIR; extraClassPath arrives
# as SPARK_CLASSPATH.
if [[ -n "${SPARK_CONF_DIR:-}" ]]; then classpath="${SPARK_CONF_DIR}:${classpath}"; fi
if [[ -n "${SPARK_CLASSPATH:-}" ]]; then classpath="${classpath}:${SPARK_CLASSPATH}"; fi

exec java "${java_options[@]}" \
  -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
  -cp "${classpath}" \
  org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
  --driver-url "${SPARK_DRIVER_URL}" \
  --executor-id "${SPARK_EXECUTOR_ID}" \
  --cores "${SPARK_EXECUTOR_CORES}" \
  --app-id "${SPARK_APPLICATION_ID}" \
  --hostname "${SPARK_EXECUTOR_POD_IP}" \
  --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
  --podName "${SPARK_EXECUTOR_POD_NAME}"
