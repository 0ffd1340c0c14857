#!/usr/bin/env bash
# The main job, end to end on one machine: set up .venv, speak the synthetic corpus, prepare
# fbank features, then the staged search of the reference recipe on the embedded store:
#   1. model-<type>-sm: random search over the model parameters, the base configuration
#      first (what pays most, bench/replay.py); no pruner: with a handful of trials of 8
#      epochs a rung at half of them would compare models still in CTC's all-blank phase
#      (hyperband's default decision point; it pays in longer, larger studies),
#   2. optim stage (= important --top-k, best, init): carries the best configuration and
#      the top parameters into
#   3. model-<type>-lg: TPE search over just the top parameters, longer trials, the carried
#      configuration first; hyperband compares the others with it at half their epochs
#      (the base configuration is never pruned),
#   4. best: the final configuration.
# About 10 minutes on a quiet 2-core CPU after set-up (docs/benchmarks.md). Re-running it is cheap:
# finished steps are no-ops.
# Environment: MODEL_TYPE (mcorr|lcorr, default mcorr), DB_URL (default: the embedded store,
# EXP/optim/studies.journal when EXP is set),
# WORKERS (local worker processes, default 2), SM_TRIALS (8), LG_TRIALS (2), TOP_K (3),
# SM_TRIAL_SECONDS (300) and LG_TRIAL_SECONDS (420): a trial still running after that long is
# pruned (some random models under the memory limit are several times slower than the base),
# MEM_LIMIT (bytes, default 1e9), UTTERANCES (training utterances spoken, default 600),
# DATA (corpus and features, default data/synth), EXP (outputs, default exp),
# EXTRA_INI (an .ini read last in both stages, e.g. fewer epochs; default none),
# SEED (seeds the samplers, so that a run can be repeated; default unseeded).
set -euo pipefail
# absolute before the cd below, so that the caller's relative paths keep their meaning
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
data=$(abspath "${DATA:-data/synth}")
exp=$(abspath "${EXP:-exp}")
extra_ini=()
seed=()
if [ -n "${SEED:-}" ]; then seed=(--seed "$SEED"); fi
if [ -n "${EXTRA_INI:-}" ]; then extra_ini=(--read-ini "$(abspath "$EXTRA_INI")"); fi
if [ -n "${DB_URL:-}" ] && [[ "$DB_URL" != *://* ]] && [ "$DB_URL" != default ]; then
  DB_URL=$(abspath "$DB_URL")
fi
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

model_type=${MODEL_TYPE:-mcorr}
feature=fbank-81-10ms
if [ -n "${EXP:-}" ]; then
  db_url=${DB_URL:-$exp/optim/studies.journal}  # everything of the run under EXP
else
  db_url=${DB_URL:-default}
fi
workers=${WORKERS:-2}
sm_trials=${SM_TRIALS:-8}
lg_trials=${LG_TRIALS:-2}
top_k=${TOP_K:-3}
sm_trial_seconds=${SM_TRIAL_SECONDS:-300}
lg_trial_seconds=${LG_TRIAL_SECONDS:-420}
# Peak bytes of one training step on the largest batch that a trial may need: configurations
# above it are pruned before training (as the recipe's GPU limits do on a cluster), which keeps
# the largest, slowest random models out of a CPU demo (the base configuration needs 6.9e8).
mem_limit=${MEM_LIMIT:-1000000000}
utterances=${UTTERANCES:-600}
conf=$exp/conf
mkdir -p "$conf"

if [ ! -e "$data/$feature/train/feats.h5" ]; then
  echo "== synthetic corpus and $feature features -> $data" >&2
  cnn-mellin prep synth "$data/corpus" --utterances "$utterances"
  cnn-mellin prep timit "$data/corpus" "$data" "$feature"
fi

sm=demo-model-$model_type-sm-$feature
lg=demo-model-$model_type-lg-$feature

completed() {
  cnn-mellin optim --study-name "$1" "$db_url" status --json |
    python -c 'import json, sys; print(json.load(sys.stdin)["counts"]["complete"])'
}

echo "== stage sm: $sm ($sm_trials random trials, $workers workers)" >&2
# (re-run: the study is there already, perhaps topped up below, so its init is skipped)
cnn-mellin optim --study-name "$sm" "$db_url" status --json >/dev/null 2>&1 || cnn-mellin \
  --read-ini "conf/optim/model-$model_type-sm.ini" --read-ini conf/optim/demo.ini \
  "${extra_ini[@]}" --device cpu \
  optim --study-name "$sm" "$db_url" \
    init "$data/$feature/train" \
      --blacklist 'training.*' 'data.*' 'model.convolutional_mellin' \
      --num-trials "$sm_trials" --pruner none --mem-limit-bytes "$mem_limit" \
      --max-trial-seconds "$sm_trial_seconds" \
      --checkpoint-dir "$exp/optim/checkpoints/$sm"
cnn-mellin "${seed[@]}" optim --study-name "$sm" "$db_url" run --sampler random --workers "$workers"
# Ranking needs two completed trials. Most random draws of the whole model space are over
# the memory limit and pruned before training (cheaply); after a run of such draws the
# stage is topped up, at most twice.
for _ in 1 2; do
  done_sm=$(completed "$sm")
  [ "$done_sm" -ge 2 ] && break
  echo "== $sm: $done_sm completed trial(s), too few to rank parameters; adding 4" >&2
  cnn-mellin optim --study-name "$sm" "$db_url" grow 4
  cnn-mellin "${seed[@]}" optim --study-name "$sm" "$db_url" run --sampler random \
    --workers "$workers"
done

# the best trial's configuration (not --independent): the lg stage's first trial is then the
# sm winner itself, trained longer (conf/optim/demo-lg.ini), so the final best can only gain
echo "== carrying the top $top_k parameters and the best configuration into $lg" >&2
cnn-mellin --read-ini conf/optim/demo-lg.ini "${extra_ini[@]}" --device cpu \
  optim --study-name "$lg" "$db_url" \
    stage "$sm" "$data/$feature/train" --top-k "$top_k" --conf-dir "$conf" \
      --num-trials "$lg_trials" --pruner hyperband --mem-limit-bytes "$mem_limit" \
      --max-trial-seconds "$lg_trial_seconds" \
      --checkpoint-dir "$exp/optim/checkpoints/$lg"

echo "== stage lg: $lg ($lg_trials TPE trials)" >&2
cnn-mellin "${seed[@]}" optim --study-name "$lg" "$db_url" run --sampler tpe --workers "$workers"

cnn-mellin optim --study-name "$lg" "$db_url" best "$conf/$lg-best.ini"
cnn-mellin optim --study-name "$lg" "$db_url" status
cnn-mellin optim --study-name "$lg" "$db_url" report "$exp/report/$lg"

cat <<DONE
== done
studies:           $sm, $lg in $db_url (optuna trials --study-name $lg --storage ${db_url/#default/exp/optim/studies.journal})
top parameters:    $conf/$lg.params
stage-sm settings: $conf/$lg.ini
final best:        $conf/$lg-best.ini
report:            $exp/report/$lg/
DONE
