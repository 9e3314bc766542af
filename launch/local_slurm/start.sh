#!/usr/bin/env bash
# Starts a one-node SLURM cluster on this host (munged, slurmctld, slurmd) with its
# configuration, state and logs in STATE_DIR; prints `export SLURM_CONF=...`.
# Needs root and `apt-get install slurm-wlm munge`; no systemd. Stop it with stop.sh.
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin  # the daemons, munged and runuser live there
die() { echo "local_slurm/start.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: start.sh STATE_DIR"
[ "$(id -u)" -eq 0 ] || die "needs root (the daemons switch to users slurm and munge)"
for tool in munge munged slurmctld slurmd sinfo sbatch; do
  command -v "$tool" >/dev/null || die "$tool not found; apt-get install -y slurm-wlm munge"
done
id slurm >/dev/null 2>&1 || die "no user slurm; apt-get install -y slurm-wlm creates it"

HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
STATE=$(cd "$1" && pwd)
CONF=$STATE/slurm.conf
for daemon in slurmctld slurmd; do
  if [ -s "$STATE/$daemon.pid" ] && kill -0 "$(cat "$STATE/$daemon.pid")" 2>/dev/null; then
    die "$daemon already runs for $STATE; run stop.sh $STATE first"
  fi
done

start_munge() {
  if munge -n >/dev/null 2>&1; then
    return  # a running munged: reuse it, and leave it running at stop
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge: /etc/munge && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  touch "$STATE/munged.started"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged did not answer; see /var/log/munge/munged.log"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {  # the first port from $1 on that nothing listens on
  local port=$1
  while ! port_free "$port"; do port=$((port + 1)); done
  echo "$port"
}

write_conf() {
  local host memory_mb ctld_port slurmd_port
  host=$(hostname -s)
  memory_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024) - 2048; print (m < 1000 ? 1000 : m)}' /proc/meminfo)
  ctld_port=$(free_port 6817)
  slurmd_port=$(free_port $((ctld_port + 1)))
  sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@MEMORY_MB@|$memory_mb|g" \
      -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
      "$HERE/slurm.conf.in" > "$CONF"
  echo "$host"
}

wait_idle() {  # until sinfo shows the node idle, at most 60 s
  for _ in $(seq 120); do
    [ "$(sinfo -h -n "$1" -o %t 2>/dev/null)" = idle ] && return
    sleep 0.5
  done
  tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  "$HERE/stop.sh" "$STATE" >&2 || true
  die "node $1 not idle after 60 s; logs above"
}

start_munge
HOST=$(write_conf)
mkdir -p "$STATE/ctld" "$STATE/spool"
chmod 755 "$STATE"  # slurmctld runs as user slurm
chown -R slurm: "$STATE"
runuser -u slurm -- test -w "$STATE/ctld" || die "user slurm cannot write $STATE/ctld; a parent folder is private"
export SLURM_CONF=$CONF
slurmctld -f "$CONF"
slurmd -f "$CONF"
wait_idle "$HOST"
echo "export SLURM_CONF=$CONF"
