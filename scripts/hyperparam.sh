#!/usr/bin/env bash
# The staged hyperparameter search of the reference recipe (docs/optim.md), one
# stage per call, for every model type x feature type:
#
#   scripts/hyperparam.sh 2.1   init  model-<m>-sm-<f>: all model.* but convolutional_mellin,
#                                     6 GiB limit, 128 trials, no pruning
#   scripts/hyperparam.sh 2.2   run   workers on model-<m>-sm-<f> (random), unless done
#   scripts/hyperparam.sh 2.3   optim stage: top-5 important + best --independent -> init
#                                     model-<m>-lg-<f> (lineage recorded)
#   scripts/hyperparam.sh 2.4   run   workers on model-<m>-lg-<f> (tpe)
#   scripts/hyperparam.sh 2.5   best of model-<m>-sm-<f>, masks capped only by proportion ->
#                                     init train-<m>-sm-<f> (training.* search)
#   scripts/hyperparam.sh 2.6   run   workers on train-<m>-sm-<f> (random)
#   scripts/hyperparam.sh 2.7   optim stage: top-10 important + best --independent -> init
#                                     train-<m>-md-<f>
#   scripts/hyperparam.sh 2.8   run   workers on train-<m>-md-<f> (random)
#   scripts/hyperparam.sh status      status of every study
#
# The "run" stages submit workers and return; wait for the studies to finish (status) before
# the next init stage. Re-running an init stage is a no-op; a run stage skips finished studies.
# Features must exist first: sbatch scripts/timit_prep.slrm TIMIT_DIR fbank-81-10ms ...
#
# Environment (defaults as in the recipe):
#   DB_URL          study database (default mysql+pymysql:///$DB_NAME?read_default_file=~/.my.cnf)
#   DB_NAME         database name in the default URL (sdrobert_db1)
#   MODEL_TYPES     "mcorr lcorr"            FEATURE_TYPES  "fbank-81-10ms sigbank-41-2ms raw"
#   OPTIM_COMMAND   how a worker is started ("sbatch --gres=gpu:t4:1 scripts/cnn_mellin.slrm";
#                   "cnn-mellin" runs one worker here and waits for it)
#   WORKERS         workers per study: a job array of that size with sbatch (default 1)
#   CNN_MELLIN      the cnn-mellin command (default cnn-mellin)    DEVICE  init device (cuda)
#   NUM_TRIALS_SM   128   TOP_K_MD 10   TOP_K_LG 5
#   MEM_SM / MEM_MD / MEM_LG  memory limits in bytes (6, 9 and 12 GiB)
#   DATA            feature root (data/timit)    CONF  where .ini/.params go (exp/conf)
#   EXTRA_INI       more .ini files read after conf/optim/model-<m>-sm.ini in stage 2.1
#                   (space-separated; e.g. fewer epochs for a trial run of the recipe)
#   INIT_OPTIONS    more init options for every stage, after the recipe's (later wins; e.g.
#                   "--num-trials 4 --num-data-workers 0" for a trial run)
# Stages 2.3 and 2.7 write CONF/<study>.params and CONF/<study>.ini exactly as the recipe's
# important / best / init calls do (optim stage is those three in one command).
set -euo pipefail
cd "$(dirname "$0")/.."

db_name=${DB_NAME:-sdrobert_db1}
db_url=${DB_URL:-"mysql+pymysql:///${db_name}?read_default_file=$(cd ~ && pwd -P)/.my.cnf"}
read -r -a model_types <<< "${MODEL_TYPES:-mcorr lcorr}"
read -r -a feature_types <<< "${FEATURE_TYPES:-fbank-81-10ms sigbank-41-2ms raw}"
read -r -a optim_command <<< "${OPTIM_COMMAND:-sbatch --gres=gpu:t4:1 scripts/cnn_mellin.slrm}"
read -r -a cnn_mellin <<< "${CNN_MELLIN:-cnn-mellin}"
workers=${WORKERS:-1}
device=${DEVICE:-cuda}
num_trials_sm=${NUM_TRIALS_SM:-128}
top_k_md=${TOP_K_MD:-10}
top_k_lg=${TOP_K_LG:-5}
gib=$((1024 ** 3))
mem_sm=${MEM_SM:-$((6 * gib))}
mem_md=${MEM_MD:-$((9 * gib))}
mem_lg=${MEM_LG:-$((12 * gib))}
data=${DATA:-data/timit}
conf=${CONF:-exp/conf}
extra_ini=()
for ini in ${EXTRA_INI:-}; do extra_ini+=(--read-ini "$ini"); done
read -r -a init_options <<< "${INIT_OPTIONS:-}"

if [ "${optim_command[0]}" = sbatch ] && [ "$workers" -gt 1 ]; then
  optim_command=("${optim_command[0]}" "--array=1-$workers" "${optim_command[@]:1}")
fi

optim() {  # optim STUDY ARGS...: cnn-mellin optim on one study
  local study=$1
  shift
  "${cnn_mellin[@]}" optim --study-name "$study" "$db_url" "$@"
}

finished() {  # finished STUDY TRIALS: the study has TRIALS trials in COMPLETE or PRUNED
  local done
  done=$(optuna trials --study-name "$1" --storage "$db_url" -f yaml 2> /dev/null \
    | grep -c -e 'state: COMPLETE' -e 'state: PRUNED' || true)
  [ "$done" -ge "$2" ]
}

run_workers() {  # run_workers STUDY SAMPLER [TRIALS]
  local study=$1 sampler=$2 trials=${3:-}
  if [ -n "$trials" ] && finished "$study" "$trials"; then
    echo "Already done $trials trials for $study"
    return
  fi
  "${optim_command[@]}" optim --study-name "$study" "$db_url" run --sampler "$sampler"
}

carry() {  # carry FROM TO TOP_K MEM FEATURE: important + best --independent of FROM -> init TO
  local from=$1 to=$2 top_k=$3 mem=$4 feature=$5
  "${cnn_mellin[@]}" --device "$device" \
    optim --study-name "$to" "$db_url" stage "$from" "$data/$feature/train" \
      --top-k "$top_k" --independent --conf-dir "$conf" --num-data-workers 4 \
      --mem-limit-bytes "$mem" ${init_options[@]+"${init_options[@]}"}
}

stage=${1:-}
case "$stage" in
  2.[1-8] | status) mkdir -p exp/logs "$conf" ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2 ;;
esac
for model_type in "${model_types[@]}"; do
  for feature_type in "${feature_types[@]}"; do
    model_sm=model-$model_type-sm-$feature_type
    model_lg=model-$model_type-lg-$feature_type
    train_sm=train-$model_type-sm-$feature_type
    train_md=train-$model_type-md-$feature_type
    case "$stage" in
      2.1)
        "${cnn_mellin[@]}" --read-ini "conf/optim/model-$model_type-sm.ini" \
          ${extra_ini[@]+"${extra_ini[@]}"} --device "$device" \
          optim --study-name "$model_sm" "$db_url" init "$data/$feature_type/train" \
            --blacklist 'training.*' 'data.*' 'model.convolutional_mellin' \
            --num-data-workers 4 --mem-limit-bytes "$mem_sm" --num-trials "$num_trials_sm" \
            --pruner none ${init_options[@]+"${init_options[@]}"} ;;
      2.2) run_workers "$model_sm" random "$num_trials_sm" ;;
      2.3) carry "$model_sm" "$model_lg" "$top_k_lg" "$mem_lg" "$feature_type" ;;
      2.4) run_workers "$model_lg" tpe ;;
      2.5)
        optim "$model_sm" best - \
          | sed 's/\(max_.*_mask\)[ ]*=.*/\1 = 10000/g' > "$conf/$train_sm.ini"
        "${cnn_mellin[@]}" --read-ini "$conf/$train_sm.ini" --device "$device" \
          optim --study-name "$train_sm" "$db_url" init "$data/$feature_type/train" \
            --blacklist 'model.*' 'training.max_.*_mask' 'training.num_epochs' \
              'training.early_.*' \
            --num-data-workers 4 --mem-limit-bytes "$mem_sm" \
            ${init_options[@]+"${init_options[@]}"} ;;
      2.6) run_workers "$train_sm" random ;;
      2.7) carry "$train_sm" "$train_md" "$top_k_md" "$mem_md" "$feature_type" ;;
      2.8) run_workers "$train_md" random ;;
      status)
        for study in "$model_sm" "$model_lg" "$train_sm" "$train_md"; do
          optim "$study" status 2> /dev/null || echo "study $study: not created yet"
        done ;;
    esac
  done
done
