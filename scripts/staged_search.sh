#!/usr/bin/env bash
# The main job, end to end on one machine within one wall-clock budget: set up .venv, speak
# the synthetic corpus (short sentences), prepare fbank features, then the staged search of
# the reference recipe on the embedded store:
#   0. plan (scripts/plan_stages.py): time a training step of the base configuration here,
#      with every worker stepping at once, and size both stages to what is left of the
#      budget: the job travels to slower and faster machines,
#   1. model-<type>-sm: random search over the model parameters on a subset of the
#      utterances, at least 12 trials (a ranking from fewer is mostly noise,
#      docs/benchmarks.md), under a memory limit that draws are redrawn against before a
#      trial exists; a trial taking over 2.5x the base configuration's time is stopped,
#      and the stage topped up to 12 completed trials,
#   2. optim stage --from-base (= important --top-k, init from the base configuration):
#      carries the top parameters into
#   3. model-<type>-lg, planned again from the epochs the sm base trial took and the time
#      left: the base, then the base with the sm winner's values of the top
#      parameters, then TPE draws over them, on all the utterances, longer trials, one
#      trial per worker and no pruner (with as many trials as workers a pruned trial frees
#      a worker that has nothing to take); a trial slower than 1.5x the base's is stopped,
#   4. best: the final configuration.
# Re-running it is cheap: finished steps are no-ops.
# Environment: BUDGET_MINUTES (wall clock of the whole job, default 15), MODEL_TYPE
# (mcorr|lcorr, default mcorr), DB_URL (default: the embedded store, EXP/optim/studies.journal
# when EXP is set), WORKERS (local worker processes, default 2), SM_TRIALS (at least this
# many, default 12), LG_TRIALS (2), TOP_K (3), MEM_LIMIT (bytes, default 3e8),
# UTTERANCES (training utterances spoken, default 1200), MAX_WORDS (words a sentence at
# most, default 6), DATA (corpus and features, default data/synth-short), EXP (outputs,
# default exp), EXTRA_INI (an .ini read last in both stages; default none), SM_TIME_RATIO and
# LG_TIME_RATIO (a trial slower than this many times the base's is stopped; 2.5 and 1.5),
# SEED (seeds the samplers, so that a run can be repeated; default unseeded).
set -euo pipefail
# absolute before the cd below, so that the caller's relative paths keep their meaning
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
data=$(abspath "${DATA:-data/synth-short}")
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
budget_s=$(( ${BUDGET_MINUTES:-15} * 60 ))
top_k=${TOP_K:-3}
# Peak bytes of one training step on the longest batch that a trial may need: draws above
# it are redrawn before a trial exists (as the recipe's GPU limits do on a cluster), which
# keeps the sm stage to small models (the base configuration needs 2.1e8 on this corpus)
mem_limit=${MEM_LIMIT:-300000000}
utterances=${UTTERANCES:-1200}
conf=$exp/conf
mkdir -p "$conf"

if [ ! -e "$data/$feature/train/feats.h5" ]; then
  echo "== synthetic corpus and $feature features -> $data" >&2
  cnn-mellin prep synth "$data/corpus" --utterances "$utterances" --max-words "${MAX_WORDS:-6}"
  cnn-mellin prep timit "$data/corpus" "$data" "$feature"
fi
base_ini=(--read-ini "conf/optim/model-$model_type-sm.ini" --read-ini conf/optim/demo.ini)
# what is left of the budget once the corpus exists, less a minute for staging and the
# report; the plan is kept, so that a re-run finds the same stages (and does nothing)
plan=$exp/conf/plan-$model_type.sh
if [ ! -e "$plan" ]; then
  left_s=$(( budget_s - SECONDS - 60 ))
  planned=$(python scripts/plan_stages.py "$data/$feature/train" --budget-s "$left_s" \
    --workers "$workers" --sm-trials "${SM_TRIALS:-12}" --lg-trials "${LG_TRIALS:-2}" \
    "${base_ini[@]}" "${extra_ini[@]}")
  printf '%s\n' "$planned" > "$plan.tmp" && mv "$plan.tmp" "$plan"
fi
# shellcheck source=/dev/null
source "$plan"

sm=demo-model-$model_type-sm-$feature
lg=demo-model-$model_type-lg-$feature

printf '[training]\nnum_epochs = %s\n' "$sm_epochs" > "$conf/$sm-epochs.ini"
echo "== stage sm: $sm ($sm_trials random trials x $sm_epochs epochs of $sm_utterances" \
  "utterances, $workers workers)" >&2
# (re-run: the study is there already, so its init is skipped)
cnn-mellin optim --study-name "$sm" "$db_url" status --json >/dev/null 2>&1 || cnn-mellin \
  "${base_ini[@]}" --read-ini "$conf/$sm-epochs.ini" "${extra_ini[@]}" --device cpu \
  optim --study-name "$sm" "$db_url" \
    init "$data/$feature/train" --train-utterances "$sm_utterances" \
      --blacklist 'training.*' 'data.*' 'model.convolutional_mellin' \
      --num-trials "$sm_trials" --pruner none --mem-limit-bytes "$mem_limit" \
      --max-trial-time-ratio "${SM_TIME_RATIO:-2.5}" \
      --checkpoint-dir "$exp/optim/checkpoints/$sm"
cnn-mellin "${seed[@]}" optim --study-name "$sm" "$db_url" run --sampler random --workers "$workers"
# a trial stopped for time ranks nothing: the stage is topped up to SM_TRIALS completed
# trials (at most twice; a lone trial gets every CPU of the pool)
for _ in 1 2; do
  complete=$(cnn-mellin optim --study-name "$sm" "$db_url" status --json |
    python -c 'import json, sys; print(json.load(sys.stdin)["counts"]["complete"])')
  missing=$(( ${SM_TRIALS:-12} - complete ))
  [ "$missing" -gt 0 ] || break
  echo "== $complete sm trials completed: adding $missing" >&2
  cnn-mellin optim --study-name "$sm" "$db_url" grow "$missing"
  cnn-mellin "${seed[@]}" optim --study-name "$sm" "$db_url" run --sampler random \
    --workers "$workers"
done

# the lg stage planned again for the time now left, from the epochs the sm base trial took
# (the first plan's few synthetic steps misjudge this machine by up to 2x)
replan=$exp/conf/plan-lg-$model_type.sh
if [ ! -e "$replan" ]; then
  left_s=$(( budget_s - SECONDS - 60 ))
  planned=$(python scripts/plan_stages.py "$data/$feature/train" --budget-s "$left_s" \
    --lg-trials "${LG_TRIALS:-2}" --lg-after "$db_url" "$sm" "$sm_utterances" \
    "${base_ini[@]}" "${extra_ini[@]}")
  printf '%s\n' "$planned" > "$replan.tmp" && mv "$replan.tmp" "$replan"
fi
# shellcheck source=/dev/null
source "$replan"
printf '[training]\nnum_epochs = %s\n' "$lg_epochs" > "$conf/$lg-epochs.ini"

# from the base configuration: sm trials (6 epochs on a subset) rank parameters well enough
# to narrow lg, but their winner is the model that learns fastest early, not the one that
# ends lowest (measured: an sm winner at 0.567 against the base's 0.624 ended lg at 0.237,
# where the base reaches 0.07). The lg stage's first trial is the base trained longer on
# all the utterances, so the final best is never worse than the base's; the second is the
# base with the sm winner's values of the top parameters
echo "== carrying the top $top_k parameters into $lg, from the base configuration" >&2
cnn-mellin --read-ini "$conf/$lg-epochs.ini" "${extra_ini[@]}" --device cpu \
  optim --study-name "$lg" "$db_url" \
    stage "$sm" "$data/$feature/train" --train-utterances "$lg_utterances" \
      --top-k "$top_k" --from-base --conf-dir "$conf" \
      --num-trials "$lg_trials" --pruner none --mem-limit-bytes "$mem_limit" \
      --max-trial-time-ratio "${LG_TIME_RATIO:-1.5}" \
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
