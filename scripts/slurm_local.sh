#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the cluster tests and for trying the
# recipe's sbatch calls without a cluster (Debian's slurm-wlm and munge, no systemd):
#   scripts/slurm_local.sh start    install (when missing) and start munged, slurmctld, slurmd
#   scripts/slurm_local.sh stop     stop the daemons this script started
#   scripts/slurm_local.sh status   say whether the cluster answers (exit 0) or not (exit 1)
#   scripts/slurm_local.sh env      print the export line clients need (SLURM_CONF=...)
# Everything it writes (slurm.conf, state, spool, logs, job completion records) lives in
# SLURM_LOCAL_DIR (default /var/tmp/cnn-mellin-slurm). sbatch, squeue, scancel and sacct
# need SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf unless /etc/slurm/slurm.conf is this one
# (start links it there when that file does not exist).
# The node is "localhost" with at least 4 CPUs (more than a 2-core machine has: workers of
# the tests are light) and the machine's memory less 1 GiB; every job gets DefMemPerCPU
# (1 GiB per CPU) unless it asks for --mem. sacct -c reads the job completion file.
# Needs root (or sudo) to install packages and run the daemons.
set -euo pipefail

dir=${SLURM_LOCAL_DIR:-/var/tmp/cnn-mellin-slurm}
conf=$dir/slurm.conf
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

answers() { SLURM_CONF=$conf timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  if [ "$cpus" -lt 4 ]; then cpus=4; fi
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  as_root mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  as_root tee "$conf" >/dev/null <<CONF
# written by scripts/slurm_local.sh
ClusterName=cnnmellin
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm_local: installing slurm-wlm and munge" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  if answers; then
    echo "slurm_local: already running ($conf)" >&2
    return
  fi
  write_conf
  if [ ! -e /etc/slurm/slurm.conf ]; then as_root ln -s "$conf" /etc/slurm/slurm.conf; fi
  if [ ! -s /etc/munge/munge.key ]; then
    as_root sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null'
    as_root chown munge:munge /etc/munge/munge.key
    as_root chmod 400 /etc/munge/munge.key
  fi
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    as_root mkdir -p /run/munge
    as_root chown munge:munge /run/munge
    as_root runuser -u munge -- /usr/sbin/munged
    as_root touch "$dir/started-munged"
  fi
  as_root slurmctld -c -f "$conf"
  as_root slurmd -c -N localhost -f "$conf"
  for _ in $(seq 60); do
    if answers; then
      echo "slurm_local: running (export SLURM_CONF=$conf)" >&2
      return
    fi
    sleep 0.5
  done
  echo "slurm_local: the node did not come up; see $dir/log/" >&2
  exit 1
}

stop() {
  local name
  for name in slurmd slurmctld; do
    if [ -s "$dir/$name.pid" ]; then as_root kill "$(cat "$dir/$name.pid")" 2>/dev/null || true; fi
  done
  if [ -e "$dir/started-munged" ]; then
    as_root kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    as_root rm -f "$dir/started-munged"
  fi
  echo "slurm_local: stopped" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "slurm_local: running ($conf)"; else echo "slurm_local: not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
