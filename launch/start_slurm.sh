#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster (Debian slurm-wlm + munge) for CI and local tests.
# Needs root and Debian/Ubuntu; no systemd required. Idempotent; state and logs in $SLURM_CI_DIR.
# Tests that submit the real slurm/*.sh scripts use it (tests/test_slurm.py).
set -euo pipefail
STATE=${SLURM_CI_DIR:-/tmp/photoz-slurm}
CONF=/etc/slurm/slurm.conf
say() { echo "[start_slurm $(date +%T)] $*"; }
running() { [[ -s "$1" ]] && [[ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" == "$2" ]]; }

[[ $(id -u) -eq 0 ]] || { echo "start_slurm: must run as root" >&2; exit 1; }

need=()
# libpmix-dev provides the libpmix.so that Slurm's mpi/pmix plugin loads (srun --mpi=pmix for mpi4py ranks);
# it must be present before slurmd starts.
for pkg in munge slurmctld slurmd slurm-client libpmix-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need+=("$pkg")
done
if (( ${#need[@]} )); then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  for attempt in 1 2 3 4 5; do
    apt-get -o DPkg::Lock::Timeout=300 update -qq &&
      apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null && break
    [[ $attempt -eq 5 ]] && { echo "start_slurm: could not install ${need[*]}" >&2; exit 1; }
    say "apt-get failed (attempt $attempt), retrying"; sleep 10
  done
  restart=1  # a slurmd started before libpmix existed cannot launch --mpi=pmix steps
fi

# munge: the key must belong to the munge user; munged refuses to start otherwise.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  say "munged up"
fi

restart=${restart:-0}
mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log" /etc/slurm
HOST=$(hostname -s)
read -r CPUS MEM < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
# CR_Core lets array tasks and small jobs share the node; OverSubscribe=YES lets jobs that ask (sbatch
# --oversubscribe) share cores, so that a job array of more tasks than this machine has cores runs at once;
# MinJobAge keeps `sbatch --wait` snappy.
config="ClusterName=photoz-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=4
KillWait=10
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=YES:8 State=UP"
if [[ "$config" != "$(cat "$CONF" 2>/dev/null)" ]]; then printf '%s\n' "$config" > "$CONF"; restart=1; fi
if (( restart )); then
  for d in slurmd slurmctld; do
    running "$STATE/$d.pid" "$d" && { kill "$(cat "$STATE/$d.pid")"; sleep 1; }
  done
fi
running "$STATE/slurmctld.pid" slurmctld || { slurmctld -c; say "slurmctld started"; }
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
running "$STATE/slurmd.pid" slurmd || { slurmd; say "slurmd started"; }

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
  case "$state" in
    idle|mixed|allocated|completing) say "cluster ready ($HOST: $CPUS CPUs, $MEM MB)"; exit 0 ;;
    drain*|down*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
say "node never became ready (state '$state')"; tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2
exit 1
