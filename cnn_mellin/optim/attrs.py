"""The names of the attributes cnn-mellin writes on studies and trials, in one place.

Trial user attributes are what ``optuna trials``, ``status``, ``report`` and the
dashboard show; study system attributes are cnn-mellin's own bookkeeping.
"""

# -- trial user attributes written by the worker ------------------------------------------
WORKER = "worker"  # host, device, pid, ... of the worker running the trial
WALL_TIME = "wall_time_s"
EPOCHS = "epochs"
PEAK_BYTES = "peak_bytes"
PEAK_METHOD = "peak_bytes_method"
ADMISSION_BYTES = "admission_bytes"
ADMISSION_METHOD = "admission_method"
PRUNE_REASON = "prune_reason"
PRUNE_KIND = "prune_kind"  # pruner | memory | oom | invalid | infeasible | nonfinite |
# timeout | a task's own (diverged, metrics, exit)
RESUMED_FROM = "resumed_from_epoch"
RESUMED_FROM_STEP = "resumed_from_step"  # optimiser steps a retry found in its checkpoint
STOPPED_AT_STEP = "stopped_at_step"  # where an interrupted trial checkpointed before handing back
# draws of this trial's parameters rejected before it (never trials, never trained)
DRAWS_REJECTED_MEMORY = "draws_rejected_memory"
DRAWS_REJECTED_INVALID = "draws_rejected_invalid"

# -- trial user attributes of the budget: replacements and failures -----------------------
REPLACES = "replaces"
RETRY_OF = "retry_of"
RETRY_COUNT = "retry_count"
REPLACE_REASON = "replace_reason"
REPLACE_KIND = "replace_kind"  # the FAIL_KIND of the trial a retry replaces
INTERRUPT_COUNT = "interrupt_count"  # signals (or neighbours' OOMs) that stopped a chain
FAIL_REASON = "fail_reason"
FAIL_KIND = "fail_kind"  # dead | interrupted | user | neighbour | error | duplicate
DUPLICATE_OF = "duplicate_of"

# -- study user attributes --------------------------------------------------------------
# every StudySettings field is one, under its own name; these are also read or written alone
NUM_TRIALS = "num_trials"  # the budget, which 'optim grow' raises
# besides the init settings: a stage made by 'optim stage', a dict with "parent" (the
# earlier study's name), "kept" (the parameters carried on as searched, with their
# importance in the parent: {name: importance}, or a list of names or [name, value] pairs),
# "carried" (the configuration the stage starts from: {name: value} or .ini text) and
# "from", "ranked_from"
LINEAGE = "lineage"

# -- constraint names given to samplers ---------------------------------------------------
MEMORY_CONSTRAINT = "memory"
VALID_CONSTRAINT = "valid"

# -- system attributes --------------------------------------------------------------------
BEAT_KEY = "cnn_mellin:heartbeat"  # trial: the worker's last heartbeat
READY_KEY = "cnn_mellin:ready"  # study: init finished writing
UID_KEY = "cnn_mellin:uid"  # study: names its checkpoint folder
STANDBY_KEY = "cnn_mellin:standby"  # study: the idle worker that stays for retries
BASE_EPOCH_SECONDS = "cnn_mellin:base_epoch_seconds"  # study: {epoch: s} of the base trial
WORKER_TIME_PREFIX = "cnn_mellin:worker_time:"  # study: per worker, {"seconds", "busy_s"}
