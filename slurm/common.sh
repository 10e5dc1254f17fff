# shellcheck shell=bash
# The shared preamble of the slurm/*.sh job scripts (sourced, never run). It provides:
#   photoz_setup          cd to the submit directory, source the site file, find Python, read the pre-emption
#                         exit code from the Python side, check the srun MPI plugin: everything that can fail
#                         fails here, at once, with a message naming the problem, before any srun
#   photoz_record DIR     append the versions and topology of this launch to DIR/launch.log
#   photoz_stage VAR [CONFIG OVERRIDES...]  copy the dataset named by $VAR to node-local storage (PHOTOZ_STAGE=1),
#                         only each node's shards with data.partition=node; checksums verified
#   photoz_config_value KEY CONFIG OVERRIDES...  print one config value
#   photoz_unstage        remove those copies again (photoz_finish does)
#   photoz_srun DIR ...   srun the ranks, surviving pre-emption signals; sets $rc (retries a step that failed to launch)
#   photoz_finish DIR     log the exit code; on "pre-empted, checkpoint saved" requeue this job (or array task)
# Variables (all optional): PHOTOZ_SITE (site name -> slurm/sites/NAME.env, or a file), PYTHON, PHOTOZ_SRUN_MPI
# (srun --mpi plugin, default pmix), PHOTOZ_SRUN_ARGS (extra srun options), PHOTOZ_EXEC (a command the ranks run
# under: a container launcher), PHOTOZ_STAGE / PHOTOZ_STAGE_DIR /
# PHOTOZ_STAGE_WORKERS (node-local staging), PHOTOZ_LAUNCH_RETRIES.

photoz_die() { echo "photoz: $*" >&2; exit 2; }
photoz_log() { echo "[photoz $(date +%T)] $*" >&2; }

PHOTOZ_SLURM_DIR=slurm

# Resolve PHOTOZ_SITE: unset -> slurm/site.sh if you made one, else slurm/sites/generic.env; a bare name -> the
# file slurm/sites/NAME.env; anything with a slash or a .env/.sh suffix -> that file. Unknown names are errors.
photoz_site_file() {
  local site=${PHOTOZ_SITE:-}
  if [[ -z $site ]]; then
    if [[ -f $PHOTOZ_SLURM_DIR/site.sh ]]; then echo "$PHOTOZ_SLURM_DIR/site.sh"; else echo "$PHOTOZ_SLURM_DIR/sites/generic.env"; fi
  elif [[ $site == */* || $site == *.env || $site == *.sh ]]; then
    [[ -f $site ]] || photoz_die "PHOTOZ_SITE=$site: no such site file"
    echo "$site"
  else
    [[ -f $PHOTOZ_SLURM_DIR/sites/$site.env ]] || photoz_die "PHOTOZ_SITE=$site: unknown site (no $PHOTOZ_SLURM_DIR/sites/$site.env;" \
      "known: $(cd "$PHOTOZ_SLURM_DIR/sites" && ls -- *.env 2>/dev/null | sed 's/\.env$//' | tr '\n' ' '))"
    echo "$PHOTOZ_SLURM_DIR/sites/$site.env"
  fi
}

photoz_load_site() {
  local file
  file=$(photoz_site_file) || exit 2
  PHOTOZ_SITE_FILE=$file
  # shellcheck disable=SC1090  # the site file is chosen at run time
  if [[ -f $file ]]; then set +u; source "$file"; set -u; fi   # module/conda scripts use unset variables
}

photoz_setup() {
  if [[ -n ${SLURM_JOB_ID:-} ]]; then cd "${SLURM_SUBMIT_DIR:?}" || exit 2; fi
  photoz_load_site
  : "${PYTHON:=python3}"
  : "${PHOTOZ_SRUN_MPI:=pmix}"   # the srun --mpi plugin your MPI was built for (Horovod over MPI needs it);
                                 # PHOTOZ_SRUN_MPI=none where Slurm has no pmix (fine for dist.backend=torch)
  command -v "$PYTHON" >/dev/null 2>&1 || photoz_die "PYTHON=$PYTHON not found: activate the environment in the site file ($PHOTOZ_SITE_FILE)"
  # The pre-emption exit code is defined once, in photoz_hpc/train/signals.py (EXIT_PREEMPTED).
  PHOTOZ_EXIT_PREEMPTED=$("$PYTHON" -c 'from photoz_hpc.train.signals import EXIT_PREEMPTED; print(EXIT_PREEMPTED)' 2>&1) \
    && [[ $PHOTOZ_EXIT_PREEMPTED =~ ^[0-9]+$ ]] \
    || photoz_die "$PYTHON cannot import photoz_hpc ($PHOTOZ_EXIT_PREEMPTED): install it or activate its environment in $PHOTOZ_SITE_FILE"
  if [[ -n ${SLURM_JOB_ID:-} && $PHOTOZ_SRUN_MPI != none ]] && command -v srun >/dev/null 2>&1; then
    srun --mpi=list 2>&1 | grep -qw -- "$PHOTOZ_SRUN_MPI" \
      || photoz_die "srun has no MPI plugin '$PHOTOZ_SRUN_MPI' (srun --mpi=list: $(srun --mpi=list 2>&1 | tr '\n' ' ')); set PHOTOZ_SRUN_MPI"
  fi
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  fi
}

# A directory that must be a prepared dataset (checked before anything is launched).
photoz_require_dataset() {
  [[ -f $1/manifest.json ]] || photoz_die "$2: $1 is not a prepared dataset (no $1/manifest.json; run slurm/prepare.sh first)"
}

# A config error (unknown key, bad value, missing file) fails here, before any srun: photoz_check_config FILE KEY=VALUE...
photoz_check_config() {
  local msg
  msg=$("$PYTHON" -c 'import sys
from photoz_hpc.config import load_config
from photoz_hpc.errors import ConfigError
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as exc:
    sys.exit(str(exc))' "$@" 2>&1) || photoz_die "config error: $msg"
}

# Print one config value with the overrides applied: photoz_config_value KEY FILE KEY=VALUE... (e.g. data.partition)
photoz_config_value() {
  local msg
  msg=$("$PYTHON" -c 'import sys
from photoz_hpc.config import load_config
from photoz_hpc.errors import ConfigError
try:
    value = load_config(sys.argv[2], sys.argv[3:])
    for part in sys.argv[1].split("."):
        value = getattr(value, part)
except (ConfigError, AttributeError) as exc:
    sys.exit(f"{sys.argv[1]}: {exc}")
print(value)' "$@" 2>&1) || photoz_die "config error: $msg"
  echo "$msg"
}

photoz_record() {
  local dir=$1
  mkdir -p "$dir"
  {
    echo "== $(date -Is) job ${SLURM_JOB_ID:-none} array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-none} restart ${SLURM_RESTART_COUNT:-0}"
    echo "site=$PHOTOZ_SITE_FILE nodes=${SLURM_JOB_NUM_NODES:-1} tasks=${SLURM_NTASKS:-1} nodelist=${SLURM_JOB_NODELIST:-$(hostname)}" \
      "gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}} master=${MASTER_ADDR:-}:${MASTER_PORT:-} srun_mpi=$PHOTOZ_SRUN_MPI"
    "$PYTHON" - <<'EOF' 2>&1 || true
import platform, subprocess, sys
parts = [("python", sys.version.split()[0])]
try:
    import torch
    parts += [("torch", torch.__version__), ("cuda", torch.version.cuda), ("cudnn", torch.backends.cudnn.version()),
              ("gpus", torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    try:
        parts.append(("nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None))
    except Exception:
        parts.append(("nccl", None))
except Exception as exc:
    parts.append(("torch", f"unavailable ({exc})"))
for name, mod in (("dali", "nvidia.dali"), ("horovod", "horovod"), ("mpi4py", "mpi4py")):
    try:
        parts.append((name, __import__(mod, fromlist=["__version__"]).__version__))
    except Exception:
        parts.append((name, None))
try:
    from mpi4py import MPI
    parts.append(("mpi", MPI.Get_library_version().splitlines()[0].strip()))
except Exception:
    parts.append(("mpi", None))
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    parts.append(("driver", out[0] if out else None))
except Exception:
    parts.append(("driver", None))
parts.append(("host", platform.node()))
print(" ".join(f"{k}={v}" for k, v in parts))
EOF
    if [[ -n ${PHOTOZ_STAGE_LINES:-} ]]; then echo "$PHOTOZ_STAGE_LINES"; fi   # photoz_stage: one line per node
  } >> "$dir/launch.log"
}

# Node-local staging (PHOTOZ_STAGE=1): photoz_stage VAR [CONFIG KEY=VALUE...]. Every node copies the dataset in
# $VAR to PHOTOZ_STAGE_DIR (default $TMPDIR or /tmp: /dev/shm is node memory, a local-disk path a local disk; see
# the site files) with `photoz-hpc stage`, in parallel, each file checked against the manifest's sha256 as it is
# copied, and $VAR then points at the copy (the same path on every node). With data.partition=node in the run's
# config (CONFIG and its overrides; no CONFIG: global) a node copies only its own shards' records. Each node's
# line (bytes, seconds, MB/s) goes to the job log and, via photoz_record, to launch.log. A shard that fails its
# checksum (corrupt in the source, or a bad copy) fails the job at once, naming the file, before any rank is
# launched; the copies are removed by photoz_unstage (photoz_finish calls it).
photoz_stage() {
  local var=$1 src dest partition=global out
  shift
  [[ ${PHOTOZ_STAGE:-0} == 1 ]] || return 0
  src=${!var}
  [[ -n $src ]] || photoz_die "PHOTOZ_STAGE=1 needs $var (the dataset directory to stage)"
  if [[ $# -gt 0 ]]; then partition=$(photoz_config_value data.partition "$@") || exit 2; fi
  PHOTOZ_STAGED_ROOT=${PHOTOZ_STAGE_DIR:-${TMPDIR:-/tmp}}/photoz-${SLURM_JOB_ID:-$$}
  dest=$PHOTOZ_STAGED_ROOT/$(basename "$src")
  photoz_log "staging $src to node-local $dest (data.partition=$partition: one copy per node, checksums verified)"
  # shellcheck disable=SC2016  # expanded by the copying shell on each node
  local copy=(bash -c 'src=$1 dest=$2
    if ! out=$("$3" -m photoz_hpc stage "$src" "$dest" --partition "$4" --node "${SLURM_NODEID:-0}" \
        --nodes "${SLURM_JOB_NUM_NODES:-1}" --workers "$5" 2>&1); then
      rm -rf "$dest"; rmdir "${dest%/*}" 2>/dev/null || true
      if [[ $out == *"sha256 mismatch"* ]]; then
        printf "photoz: staging on %s: the copy of %s fails verification (a corrupt shard in the source, or a bad copy):\n%s\n" \
          "$(hostname)" "$src" "$out" >&2
      else
        printf "photoz: staging on %s: copying %s to %s failed:\n%s\n" "$(hostname)" "$src" "$dest" "$out" >&2
      fi
      exit 1
    fi
    echo "$out" >&2' photoz-stage "$src" "$dest" "$PYTHON" "$partition" "${PHOTOZ_STAGE_WORKERS:-8}")
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    out=$(srun --mpi=none --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" \
      --kill-on-bad-exit=1 "${copy[@]}" 2>&1) || { echo "$out" >&2; photoz_die "staging $src to $dest failed (see above): nothing was launched"; }
  else
    out=$("${copy[@]}" 2>&1) || { echo "$out" >&2; photoz_die "staging $src to $dest failed (see above)"; }
  fi
  echo "$out" >&2
  PHOTOZ_STAGE_LINES=$(grep '^photoz: staged ' <<< "$out" || true)   # one per node: photoz_record logs them
  printf -v "$var" '%s' "$dest"
  export "${var?}"
}

# Remove the node-local copies of photoz_stage (one step per node; a no-op when nothing was staged).
photoz_unstage() {
  [[ -n ${PHOTOZ_STAGED_ROOT:-} ]] || return 0
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    srun --mpi=none --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" \
      --kill-on-bad-exit=0 rm -rf -- "$PHOTOZ_STAGED_ROOT" || photoz_log "could not remove the staged copies in $PHOTOZ_STAGED_ROOT"
  else
    rm -rf -- "$PHOTOZ_STAGED_ROOT"
  fi
  PHOTOZ_STAGED_ROOT=""
}

# Wait (at most $1 s) until no slurmstepd of an earlier step of this job is left on any of its nodes. srun returns,
# and slurmctld forgets a step, before that step's slurmstepd has exited: a step cancelled by --kill-on-bad-exit
# (one rank exited with the pre-emption code before the others) keeps its pmix socket (SlurmdSpoolDir/stepd.slurm.pmix.JOB.STEP) bound
# for seconds more. The probe is a step of its own (--mpi=none, one task per node) and skips its own slurmstepd.
photoz_wait_steps_gone() {
  [[ -n ${SLURM_JOB_ID:-} ]] || return 0
  local n=${SLURM_JOB_NUM_NODES:-1}
  # shellcheck disable=SC2016  # expanded by the probe's shell on each node
  srun --mpi=none --nodes="$n" --ntasks="$n" --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=0 bash -c '
    for _ in $(seq $((2 * $1))); do
      pgrep -f "^slurmstepd: \[$SLURM_JOB_ID\.[0-9]+\]" -a | grep -vF "[$SLURM_JOB_ID.$SLURM_STEP_ID]" >/dev/null || exit 0
      sleep 0.5
    done
    echo "photoz: a slurmstepd of job $SLURM_JOB_ID is still running on $(hostname) after $1 s" >&2' photoz-probe "$1" || true
}

# srun the ranks: "$@" is the command each rank runs. Pre-emption/time limit: the ranks get SIGUSR1
# (--signal=USR1@T) or SIGTERM, checkpoint and exit $PHOTOZ_EXIT_PREEMPTED. This shell must survive until srun
# returns so that it can requeue: srun runs in the background and the traps only note the signal (`wait` returns
# early on a trapped signal, so it is repeated until srun has ended). USR1 sent to this shell alone
# (--signal=B:USR1@T, scancel --batch) is passed on to srun, which forwards it to the ranks; TERM is not (srun
# answers SIGTERM by SIGKILLing the ranks; Slurm signals them itself).
# A step that fails before any rank started (every rank touches a marker first) is retried after a pause: a
# requeued job's first step has the same id (JOB.0) as its previous incarnation's, whose slurmstepd may still
# be tearing down on the node if the job was requeued by Slurm rather than by photoz_finish; its pmix server
# then cannot bind its socket, the launch fails ("task 0 launch failed: Unspecified error") and srun exits 0.
photoz_srun() {
  local dir=$1 attempt=0 marks
  shift
  local exec_prefix=()
  [[ -n ${PHOTOZ_EXEC:-} ]] && read -r -a exec_prefix <<< "$PHOTOZ_EXEC"
  local extra=()
  [[ -n ${PHOTOZ_SRUN_ARGS:-} ]] && read -r -a extra <<< "$PHOTOZ_SRUN_ARGS"
  marks=$dir/.launch/${SLURM_JOB_ID:-local}
  while :; do
    rm -rf "$marks"; mkdir -p "$marks"
    pid="" sig=""
    trap 'sig=TERM; echo "batch shell: SIGTERM, waiting for the ranks to checkpoint" >&2' TERM
    trap 'sig=USR1; [[ -n $pid ]] && kill -USR1 "$pid" 2>/dev/null || true' USR1
    set +e
    srun --kill-on-bad-exit=1 --cpu-bind=cores --mpi="$PHOTOZ_SRUN_MPI" "${extra[@]}" \
      bash -c ': > "$0/${SLURM_PROCID:-0}"; exec "$@"' "$marks" "${exec_prefix[@]}" "$@" &
    pid=$!
    while :; do
      sig=""
      wait "$pid"; rc=$?
      [[ -n $sig && $rc -gt 128 ]] || break         # interrupted by a trapped signal: srun still running
    done
    trap - TERM USR1   # `scontrol requeue` ends this shell with SIGTERM: it must not outlive the requeue
    set -e
    if [[ -z $(ls -A "$marks") && -z $sig && $attempt -lt ${PHOTOZ_LAUNCH_RETRIES:-5} ]]; then
      attempt=$((attempt + 1))
      echo "== $(date -Is) step launch failed (exit $rc, no rank started): retry $attempt in $((2 * attempt)) s" >> "$dir/launch.log"
      photoz_log "step launch failed before any rank started (exit $rc): retrying in $((2 * attempt)) s"
      sleep $((2 * attempt))
      photoz_wait_steps_gone 60
      continue
    fi
    if [[ -z $(ls -A "$marks") && -z $sig ]]; then
      photoz_log "no rank ever started (step launch failed $attempt times): giving up"
      if [[ $rc -eq 0 ]]; then rc=1; fi
    fi
    rm -rf "$marks"
    return 0
  done
}

# Log the exit code, remove staged copies; on PHOTOZ_EXIT_PREEMPTED requeue, once the last step has left every node, and exit 0.
photoz_finish() {
  local dir=$1
  echo "== $(date -Is) exit code $rc" >> "$dir/launch.log"
  photoz_unstage                                   # a requeued job stages again (perhaps on other nodes)
  if [[ $rc -eq $PHOTOZ_EXIT_PREEMPTED && -n ${SLURM_JOB_ID:-} ]]; then
    echo "pre-empted or out of time: checkpoint saved, requeueing job ${SLURM_JOB_ID}"
    photoz_wait_steps_gone 60
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
