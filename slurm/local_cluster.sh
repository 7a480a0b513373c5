#!/usr/bin/env bash
# A real single-node SLURM cluster on 127.0.0.1, with accounting (slurmdbd + MariaDB), for tests.
#
#   slurm/local_cluster.sh install            apt-get the Debian packages if missing (needs root)
#   slurm/local_cluster.sh start  STATE_DIR   start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   slurm/local_cluster.sh stop   STATE_DIR   cancel jobs, kill each daemon by its recorded PID
#   slurm/local_cluster.sh status STATE_DIR   print each daemon's PID and state; rc 0 iff all run
#   slurm/local_cluster.sh env    STATE_DIR   print the client environment (SLURM_CONF=...)
#
# Everything lives under STATE_DIR (configs, logs, PIDs, the database, spool dirs); no systemd.
# Clients only need `export SLURM_CONF=STATE_DIR/etc/slurm.conf`. All daemons run as root.
# Tunables (environment): SLURM_LOCAL_CLUSTER_NAME (default "local"), SLURM_LOCAL_NODE ("localnode"),
# SLURM_LOCAL_PARTITION ("debug"), SLURM_LOCAL_CRED_EXPIRE (10 s: the delay before a requeued job
# may start again; Slurm's default is 120 s), SLURM_LOCAL_TIMEOUT (60 s to wait for readiness).
set -euo pipefail

CLUSTER=${SLURM_LOCAL_CLUSTER_NAME:-local}
NODE=${SLURM_LOCAL_NODE:-localnode}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)    # start order; stop is the reverse
PACKAGES=(munge mariadb-server mariadb-client slurmdbd slurmctld slurmd slurm-client)
BINARIES=(munged munge mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sacctmgr sbatch sacct)

T0=$(date +%s.%N)
log() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- install
cmd_install() {
  local missing=() b
  for b in "${BINARIES[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "packages present ($(elapsed) s)"; return 0; fi
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run 'slurm/local_cluster.sh install' as root"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  # Keep package scripts from starting system services (there is no init system to own them).
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confold install --no-install-recommends)
  if ! "${apt[@]}" "${PACKAGES[@]}" >/tmp/local_cluster_apt.log 2>&1; then
    apt-get update -q >>/tmp/local_cluster_apt.log 2>&1 || true
    "${apt[@]}" "${PACKAGES[@]}" >>/tmp/local_cluster_apt.log 2>&1 \
      || { [ $made_policy -eq 1 ] && rm -f "$policy"; tail -20 /tmp/local_cluster_apt.log >&2;
           die "apt-get install failed (log: /tmp/local_cluster_apt.log)"; }
  fi
  [ $made_policy -eq 1 ] && rm -f "$policy"
  log "installed ($(elapsed) s)"
}

# ---------------------------------------------------------------- helpers
pid_of() { cat "$S/run/$1.pid" 2>/dev/null || true; }
running() {  # running PID: the process exists and is not a zombie waiting to be reaped
  local st; st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
alive() {  # alive NAME: the recorded PID runs and is that daemon
  local pid; pid=$(pid_of "$1")
  [ -n "$pid" ] && running "$pid" && grep -qx "$1" "/proc/$pid/comm" 2>/dev/null
}
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {  # a random unused TCP port that is not in the arguments
  local p i
  for i in $(seq 200); do
    p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
    case " $* " in *" $p "*) continue ;; esac
    port_in_use "$p" || { echo "$p"; return 0; }
  done
  die "no free TCP port found on 127.0.0.1"
}
launch() {  # launch NAME CMD...: run CMD in the foreground of a new session, record its PID
  local name=$1; shift
  setsid "$@" </dev/null >>"$S/log/$name.out" 2>&1 &
  echo $! >"$S/run/$name.pid"
}
wait_for() {  # wait_for WHAT CMD...: retry CMD until it succeeds or TIMEOUT passes
  local what=$1 t_end; shift
  t_end=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$t_end" ] || { dump_logs; die "timed out after ${TIMEOUT}s waiting for $what"; }
    sleep 0.2
  done
}
dump_logs() {
  local f
  for f in "$S"/log/*; do [ -s "$f" ] && { echo "--- $f" >&2; tail -15 "$f" >&2; }; done
}
mysql_root() { mariadb --no-defaults -S "$S/mysql/mysqld.sock" -uroot "$@"; }
need_state_dir() {
  [ -n "${1:-}" ] || die "usage: $0 $CMD STATE_DIR"
  mkdir -p "$1"; S=$(cd "$1" && pwd)
  export SLURM_CONF="$S/etc/slurm.conf"
}

# ---------------------------------------------------------------- configuration
write_configs() {
  mkdir -p "$S"/{etc,run,log,munge,mysql,ctld,spool}
  chmod 755 "$S/munge"; chmod 700 "$S/etc"
  if [ ! -s "$S/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$S/munge/munge.key"; chmod 400 "$S/munge/munge.key"
  fi
  # Ports are chosen once and kept, unless something else took them meanwhile.
  if [ -s "$S/etc/ports.env" ]; then . "$S/etc/ports.env"; fi
  local p
  for p in ${CTLD_PORT:-} ${SLURMD_PORT:-} ${DBD_PORT:-} ${MYSQL_PORT:-}; do
    port_in_use "$p" && { unset CTLD_PORT; break; }
  done
  if [ -z "${CTLD_PORT:-}" ]; then
    CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port "$CTLD_PORT")
    DBD_PORT=$(free_port "$CTLD_PORT" "$SLURMD_PORT")
    MYSQL_PORT=$(free_port "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT")
    printf 'CTLD_PORT=%s\nSLURMD_PORT=%s\nDBD_PORT=%s\nMYSQL_PORT=%s\n' \
      "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$MYSQL_PORT" >"$S/etc/ports.env"
  fi
  # The node line takes the machine's real CPUs and memory as slurmd itself detects them.
  local hw cpus mem host
  hw=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs/RealMemory from 'slurmd -C': $hw"
  host=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
  local auth="socket=$S/munge/munge.socket.2,cred_expire=$CRED_EXPIRE"
  cat >"$S/etc/slurm.conf" <<EOF
# Generated by slurm/local_cluster.sh: a one-node test cluster on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=$auth
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.daemon.pid
SlurmdPidFile=$S/run/slurmd.daemon.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers rarely delegate cgroups: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For auth/munge this names the MUNGE socket used to talk to slurmdbd (sacctmgr, slurmctld).
AccountingStoragePass=$S/munge/munge.socket.2
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( mem / cpus ))
PriorityType=priority/basic
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Like many sites: batch jobs are requeueable only when submitted with --requeue.
JobRequeue=0
InactiveLimit=0
KillWait=2
MinJobAge=30
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
UnkillableStepTimeout=30
Waittime=0
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$S/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket.2
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$S/log/slurmdbd.log
PidFile=$S/run/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$S/etc/slurmdbd.conf"
}

# ---------------------------------------------------------------- daemons
start_munged() {
  launch munged munged -F --force --key-file="$S/munge/munge.key" --socket="$S/munge/munge.socket.2" \
    --pid-file="$S/munge/munged.pid" --log-file="$S/log/munged.log" --seed-file="$S/munge/munged.seed"
  wait_for munged bash -c "munge -n -S '$S/munge/munge.socket.2' | unmunge -S '$S/munge/munge.socket.2'"
}

start_mariadbd() {
  local data="$S/mysql/data"
  if [ ! -d "$data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$data" --user=root --auth-root-authentication-method=normal \
      --skip-test-db >"$S/log/mariadb-install.log" 2>&1 || { dump_logs; die "mariadb-install-db failed"; }
  fi
  launch mariadbd mariadbd --no-defaults --user=root --datadir="$data" --socket="$S/mysql/mysqld.sock" \
    --pid-file="$S/mysql/mysqld.pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$S/log/mariadb.log" --skip-log-bin --innodb-flush-log-at-trx-commit=0 \
    --innodb-buffer-pool-size=512M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
  wait_for mariadbd mysql_root -e "SELECT 1"
  mysql_root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  launch slurmdbd slurmdbd -D
  wait_for slurmdbd sacctmgr -n show cluster
  local user; user=$(id -un)
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i -Q add account tests Cluster="$CLUSTER" Description=tests Organization=tests >/dev/null 2>&1 || true
  sacctmgr -i -Q add user "$user" Account=tests Cluster="$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -n -P show assoc cluster="$CLUSTER" user="$user" format=account | grep -q . \
    || die "sacctmgr did not register user $user on cluster $CLUSTER (see $S/log/slurmdbd.log)"
}

start_slurmctld() {
  launch slurmctld slurmctld -D -f "$S/etc/slurm.conf"
  wait_for slurmctld scontrol ping
}

start_slurmd() {
  mkdir -p "$S/spool/$NODE"
  launch slurmd slurmd -D -f "$S/etc/slurm.conf" -N "$NODE"
  node_idle() { sinfo -h -n "$NODE" -o %t | grep -qx idle; }
  wait_for "node $NODE to be idle" node_idle
  wait_for "sacct" sacct -n -X
}

cmd_start() {
  need_state_dir "$@"
  [ "$(id -u)" -eq 0 ] || die "the daemons run as root; run as root (or use an existing cluster)"
  if cmd_status "$S" >/dev/null 2>&1; then log "already running in $S ($(elapsed) s)"; return 0; fi
  local d
  for d in "${DAEMONS[@]}"; do alive "$d" && { log "restarting: stopping leftovers"; cmd_stop "$S"; break; }; done
  write_configs
  for d in "${DAEMONS[@]}"; do "start_$d"; log "$d up (pid $(pid_of "$d"), $(elapsed) s)"; done
  log "cluster '$CLUSTER' ready in $(elapsed) s; export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid NAME: SIGTERM, wait up to 10 s, then SIGKILL
  local name=$1 pid i; pid=$(pid_of "$name")
  if alive "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do running "$pid" || break; sleep 0.1; done
    running "$pid" && { log "$name ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$S/run/$name.pid"
}

cmd_stop() {
  need_state_dir "$@"
  if alive slurmctld; then  # let running jobs end through Slurm so no job processes outlive it
    local ids i
    ids=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$ids" ]; then
      scancel $ids 2>/dev/null || true
      for i in $(seq 25); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  local i
  for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do stop_pid "${DAEMONS[$i]}"; done
  rm -f "$S/munge/munge.socket.2"* "$S/mysql/mysqld.sock"
  log "stopped ($(elapsed) s)"
}

cmd_status() {
  need_state_dir "$@"
  local d ok=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d running pid $(pid_of "$d")"; else echo "$d stopped"; ok=1; fi
  done
  if [ $ok -eq 0 ]; then sinfo -h -N -o "%N %t %c %m" 2>/dev/null || ok=1; fi
  return $ok
}

cmd_env() { need_state_dir "$@"; echo "SLURM_CONF=$SLURM_CONF"; }

CMD=${1:-}
shift || true
case "$CMD" in
  install) cmd_install ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  env) cmd_env "$@" ;;
  *) echo "usage: $0 {install|start STATE_DIR|stop STATE_DIR|status STATE_DIR|env STATE_DIR}" >&2; exit 2 ;;
esac
