#!/usr/bin/env bash
# A worker pool of hundreds of sbatch jobs on one study, through a storage proxy job:
#   scripts/proxy_pool.sh DB_URL STUDY N [RUN OPTIONS...]
# submits
#   1. the proxy: scripts/cnn_mellin.slrm optim DB_URL serve --host 0.0.0.0 --port 0
#      --address-file exp/proxy/STUDY.addr (only it connects to the database: at most
#      --threads connections, 8 by default), on a node the workers can reach;
#   2. N workers (a job array, started once the proxy job has started): scripts/
#      proxy_worker.slrm, which waits for the address file and runs
#      optim --study-name STUDY grpc://HOST:PORT run [RUN OPTIONS...];
#   3. a job that stops the proxy (scancel, SIGTERM) once every worker has ended.
# The study must exist (optim DB_URL init, or init through the proxy). Prints the three job ids.
# Environment: PROXY_SBATCH (default "--time=2-00:00:00 --cpus-per-task=2 --mem=4G"), and
# WORKER_SBATCH (default "--gres=gpu:1") sbatch options of the proxy and of the workers;
# ADDRESS_DIR (exp/proxy). The address file is on the submit directory's file system, which
# the nodes share. The proxy has no authentication: keep its port inside the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -lt 3 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
db_url=$1 study=$2 workers=$3
shift 3
read -r -a proxy_sbatch <<< "${PROXY_SBATCH:---time=2-00:00:00 --cpus-per-task=2 --mem=4G}"
read -r -a worker_sbatch <<< "${WORKER_SBATCH:---gres=gpu:1}"
address_dir=${ADDRESS_DIR:-exp/proxy}
address=$address_dir/$study.addr
mkdir -p exp/logs "$address_dir"
rm -f "$address"  # a stale address (an earlier proxy) must not be found

proxy_job=$(sbatch --parsable --job-name="proxy-$study" "${proxy_sbatch[@]}" \
  scripts/cnn_mellin.slrm optim "$db_url" serve --host 0.0.0.0 --port 0 \
  --address-file "$address")
workers_job=$(sbatch --parsable --job-name="worker-$study" --array="1-$workers" \
  --dependency="after:$proxy_job" "${worker_sbatch[@]}" \
  scripts/proxy_worker.slrm "$address" optim --study-name "$study" @PROXY run "$@")
stop_job=$(sbatch --parsable --job-name="stop-proxy-$study" --time=5 \
  --dependency="afterany:$workers_job" --output=/dev/null --wrap="scancel $proxy_job")
echo "proxy $proxy_job, workers $workers_job, stop $stop_job"
