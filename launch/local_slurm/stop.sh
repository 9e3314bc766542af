#!/usr/bin/env bash
# Stops the cluster that start.sh STATE_DIR started: cancels its jobs, stops each slurmd and
# slurmctld by their pid files, and munged only if start.sh started it and no other cluster
# that start.sh started still runs (common.sh). It acts only on daemons that still run with
# STATE_DIR's slurm.conf: run twice, or on a cluster that is gone, it stops nothing else (its
# ports may be another cluster's by then, its pids another process's).
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin

[ $# -eq 1 ] || { echo "usage: stop.sh STATE_DIR" >&2; exit 1; }
STATE=$(cd "$1" && pwd) || exit 1
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
source "$(cd "$(dirname "$0")" && pwd)/common.sh"

cancel_jobs() {  # tasks outlive slurmd otherwise; KillWait is 30 s
  local jobs
  own_pid "$STATE/slurmctld.pid" "$CONF" >/dev/null || return 0  # the port is not ours
  jobs=$(squeue -h -o %i 2>/dev/null) || return 0
  [ -n "$jobs" ] || return 0
  scancel $jobs
  for _ in $(seq 80); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.5
  done
}

stop_pid_file() {  # TERM, then KILL after 15 s; only a daemon of this cluster
  local pid
  pid=$(own_pid "$1" "$CONF") || { rm -f "$1"; return 0; }
  kill "$pid" 2>/dev/null
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  rm -f "$1"
}

cancel_jobs
for pid_file in "$STATE"/slurmd*.pid; do stop_pid_file "$pid_file"; done
stop_pid_file "$STATE/slurmctld.pid"
[ -d "$SHARED/clusters" ] || exit 0
exec 9>"$SHARED/lock"
flock 9
rm -f "$(registry_entry "$STATE")"
for entry in "$SHARED"/clusters/*; do  # forget clusters whose slurmctld is gone (never stopped)
  [ -e "$entry" ] || continue
  other=$(cat "$entry")
  own_pid "$other/slurmctld.pid" "$other/slurm.conf" >/dev/null || rm -f "$entry"
done
if [ -e "$SHARED/munged.started" ] && [ -z "$(ls -A "$SHARED/clusters")" ]; then
  if ! munged --stop >/dev/null 2>&1; then   # an older munged: by its pid file, if it is munged
    pid=$(cat /run/munge/munged.pid 2>/dev/null)
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ] && kill "$pid"
  fi
  rm -f "$SHARED/munged.started"
fi
exit 0
