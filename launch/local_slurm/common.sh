# Sourced by start.sh and stop.sh: what every cluster on this host shares, and how a script
# tells its own daemons from a stale pid file (a daemon that died, its pid since reused).

# munged is one per host, shared by every cluster started here: start.sh starts it if none
# runs (and marks that in $SHARED), each cluster registers itself in $SHARED/clusters, and
# stop.sh stops munged only when it stopped the last registered cluster. start.sh holds
# $SHARED/lock from munged until its daemons listen, so two clusters never choose the same
# free ports; stop.sh holds it to update the registry.
SHARED=/run/brainscale-local-slurm

registry_entry() {  # the file that registers the cluster of state folder $1
  echo "$SHARED/clusters/$(echo "$1" | md5sum | cut -c1-16)"
}

own_pid() {  # the pid in pid file $1 if it runs with configuration $2 (our daemon), else fails
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$2" || return 1
  echo "$pid"
}
