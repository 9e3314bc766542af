#!/usr/bin/env bash
# Starts a SLURM cluster on this host (munged, slurmctld, one slurmd per node) with its
# configuration, state and logs in STATE_DIR; prints `export SLURM_CONF=...`.
# NODES (default 1): 1 is this host as the one node; 2 or more are nodes n1..nN, each its
# own slurmd on this host (their names are added to /etc/hosts, as JAX's SLURM detection
# resolves the first node's name). Needs root and `apt-get install slurm-wlm munge`; no
# systemd. Stop it with stop.sh.
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin  # the daemons, munged and runuser live there
die() { echo "local_slurm/start.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: start.sh STATE_DIR [NODES]"
NODES=${2:-1}
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "NODES must be a number from 1 to 99, not $NODES"
[ "$(id -u)" -eq 0 ] || die "needs root (the daemons switch to users slurm and munge)"
for tool in munge munged slurmctld slurmd sinfo sbatch; do
  command -v "$tool" >/dev/null || die "$tool not found; apt-get install -y slurm-wlm munge"
done
id slurm >/dev/null 2>&1 || die "no user slurm; apt-get install -y slurm-wlm creates it"

HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
STATE=$(cd "$1" && pwd)
CONF=$STATE/slurm.conf
source "$HERE/common.sh"
for pid_file in "$STATE"/slurmctld.pid "$STATE"/slurmd*.pid; do
  if own_pid "$pid_file" "$CONF" >/dev/null; then
    die "$(basename "$pid_file" .pid) already runs for $STATE; run stop.sh $STATE first"
  fi
done
rm -f "$STATE"/slurmctld.pid "$STATE"/slurmd*.pid  # stale: their daemons are gone

mkdir -p "$SHARED/clusters"
exec 9>"$SHARED/lock"

start_munge() {
  if munge -n >/dev/null 2>&1; then
    return  # a running munged: reuse it
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge: /etc/munge && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged 9>&-  # the lock stays with this script
  touch "$SHARED/munged.started"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged did not answer; see /var/log/munge/munged.log"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {  # the first port from $1 on that nothing listens on
  local port=$1
  while ! port_free "$port"; do port=$((port + 1)); done
  echo "$port"
}

node_names() {  # this host alone, or n1..nN
  if [ "$NODES" -eq 1 ]; then hostname -s; else seq -f 'n%g' 1 "$NODES"; fi
}

resolvable() {  # made-up node names must resolve to this host (JAX's coordinator address)
  local name
  for name in "$@"; do
    getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >> /etc/hosts
  done
}

write_conf() {
  local host memory_mb ctld_port port name names
  host=$(hostname -s)
  memory_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024) - 2048; print (m < 1000 ? 1000 : m)}' /proc/meminfo)
  ctld_port=$(free_port 6817)
  sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
      "$HERE/slurm.conf.in" > "$CONF"
  port=$ctld_port
  for name in $(node_names); do
    port=$(free_port $((port + 1)))
    echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=8 Boards=1" \
         "SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=$memory_mb" \
         "State=UNKNOWN" >> "$CONF"
  done
  names=$(node_names | paste -sd, -)
  echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4" >> "$CONF"
}

fail() {  # stops what this script started, with the daemons' logs, then dies
  flock -u 9
  tail -n 20 "$STATE/slurmctld.log" "$STATE"/slurmd-*.log >&2 || true
  "$HERE/stop.sh" "$STATE" >&2 || true
  die "$1; logs above"
}

wait_idle() {  # until sinfo shows every node idle, at most 60 s
  for _ in $(seq 120); do
    [ "$(sinfo -h -N -o %t 2>/dev/null | sort -u)" = idle ] && return
    sleep 0.5
  done
  fail "nodes $(node_names | paste -sd, -) not all idle after 60 s"
}

flock 9   # until the daemons listen: a cluster starting beside this one waits here
start_munge
echo "$STATE" > "$(registry_entry "$STATE")"
[ "$NODES" -eq 1 ] || resolvable $(node_names)
write_conf
mkdir -p "$STATE/ctld"
chmod 755 "$STATE"  # slurmctld runs as user slurm
chown -R slurm: "$STATE"
runuser -u slurm -- test -w "$STATE/ctld" || die "user slurm cannot write $STATE/ctld; a parent folder is private"
export SLURM_CONF=$CONF
slurmctld -f "$CONF" 9>&-   # the daemons must not hold the lock
if [ "$NODES" -eq 1 ]; then
  slurmd -f "$CONF" 9>&-
else
  for name in $(node_names); do slurmd -f "$CONF" -N "$name" 9>&-; done
fi
wait_idle
# sinfo asks the port in $CONF: make sure it is this cluster's slurmctld that answers
own_pid "$STATE/slurmctld.pid" "$CONF" >/dev/null || fail "slurmctld of $STATE is not running"
flock -u 9
echo "export SLURM_CONF=$CONF"
