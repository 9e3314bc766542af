#!/usr/bin/env bash
# Stops the cluster that start.sh STATE_DIR started: cancels its jobs, stops each slurmd and
# slurmctld by their pid files, and munged only if start.sh started it and no other cluster
# that start.sh started still runs (start.sh, $SHARED).
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin

[ $# -eq 1 ] || { echo "usage: stop.sh STATE_DIR" >&2; exit 1; }
STATE=$(cd "$1" && pwd) || exit 1
export SLURM_CONF=$STATE/slurm.conf

cancel_jobs() {  # tasks outlive slurmd otherwise; KillWait is 30 s
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null) || return 0
  [ -n "$jobs" ] || return 0
  scancel $jobs
  for _ in $(seq 80); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.5
  done
}

stop_pid_file() {  # TERM, then KILL after 15 s
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

cancel_jobs
for pid_file in "$STATE"/slurmd*.pid; do stop_pid_file "$pid_file"; done
stop_pid_file "$STATE/slurmctld.pid"
SHARED=/run/brainscale-local-slurm
[ -d "$SHARED/clusters" ] || exit 0
exec 9>"$SHARED/lock"
flock 9
rm -f "$SHARED/clusters/$(echo "$STATE" | md5sum | cut -c1-16)"
for entry in "$SHARED"/clusters/*; do  # forget clusters whose slurmctld is gone (never stopped)
  [ -e "$entry" ] || continue
  pid_file="$(cat "$entry")/slurmctld.pid"
  { [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; } || rm -f "$entry"
done
if [ -e "$SHARED/munged.started" ] && [ -z "$(ls -A "$SHARED/clusters")" ]; then
  munged --stop >/dev/null 2>&1 || stop_pid_file /run/munge/munged.pid
  rm -f "$SHARED/munged.started"
fi
