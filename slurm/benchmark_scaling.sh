#!/bin/bash
# Training throughput of MoCo pretraining at 1, 2, 4, ... nodes: weak scaling (fixed batch per rank) or strong
# scaling (fixed global batch), either backend; one job per size, then a merge job writing the table.
#   bash slurm/benchmark_scaling.sh --submit 1 2 4 8                  # from a login node: jobs at 1, 2, 4, 8 nodes
#   PHOTOZ_SCALING=strong PHOTOZ_BACKEND=horovod bash slurm/benchmark_scaling.sh --submit 1 2 4
#   bash slurm/benchmark_scaling.sh --merge runs/scaling              # the table again, from the runs' summary.json
# Each job is a short pretraining run (PHOTOZ_STEPS steps; the trainer excludes its warm-up steps from img/s) into
# PHOTOZ_SCALING_DIR/<mode>-<backend>-r<ranks>/; the merge writes scaling.json and scaling.md (img/s, per rank,
# efficiency against the smallest run) there. PHOTOZ_SCALING_UNIT=tasks scales ranks on one node instead of nodes.
# Extra sbatch options: PHOTOZ_SCALING_SBATCH. Other variables as in slurm/pretrain.sh (PHOTOZ_CONFIG, PHOTOZ_DATA, PHOTOZ_SITE, PHOTOZ_SRUN_MPI, ...).
#SBATCH --job-name=photoz-scaling
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [[ -n ${SLURM_JOB_ID:-} ]]; then cd "${SLURM_SUBMIT_DIR:?}"; else cd "$(dirname "$0")/.."; fi
source slurm/common.sh

: "${PHOTOZ_SCALING:=weak}"                        # weak: PHOTOZ_BATCH per rank; strong: PHOTOZ_GLOBAL_BATCH in all
: "${PHOTOZ_BACKEND:=auto}"
: "${PHOTOZ_SCALING_DIR:=runs/scaling}"
: "${PHOTOZ_SCALING_UNIT:=nodes}"                  # nodes | tasks (ranks on one node)
: "${PHOTOZ_BATCH:=128}"
: "${PHOTOZ_GLOBAL_BATCH:=1024}"
: "${PHOTOZ_STEPS:=60}"
: "${PHOTOZ_CONFIG:=configs/pretrain.yaml}"
[[ $PHOTOZ_SCALING == weak || $PHOTOZ_SCALING == strong ]] || photoz_die "PHOTOZ_SCALING must be weak or strong, got '$PHOTOZ_SCALING'"
[[ $PHOTOZ_SCALING_UNIT == nodes || $PHOTOZ_SCALING_UNIT == tasks ]] || photoz_die "PHOTOZ_SCALING_UNIT must be nodes or tasks"

merge() {
  "$PYTHON" - "$1" "$PHOTOZ_SCALING" <<'PY'
import json, sys
from pathlib import Path
root, mode = Path(sys.argv[1]), sys.argv[2]
rows = []
for p in sorted(root.glob(f"{mode}-*-r*/summary.json")):
    s = json.loads(p.read_text())
    if s.get("img_per_s"):
        rows.append({"run": p.parent.name, "backend": s["backend"], "ranks": s["world_size"], "global_batch": s["global_batch"],
                     "img_per_s": s["img_per_s"], "img_per_s_per_rank": s["img_per_s"] / s["world_size"],
                     "data_wait_frac": s.get("data_wait_frac"), "device": s["device"]})
if not rows:
    sys.exit(f"no {mode}-scaling summary.json with img_per_s under {root}")
rows.sort(key=lambda r: (r["backend"], r["ranks"]))
for r in rows:
    base = min((b for b in rows if b["backend"] == r["backend"]), key=lambda b: b["ranks"])
    ideal = base["img_per_s"] * r["ranks"] / base["ranks"]
    r["efficiency"] = r["img_per_s"] / ideal
(root / f"scaling-{mode}.json").write_text(json.dumps({"mode": mode, "runs": rows}, indent=2))
lines = [f"{mode} scaling (img/s from each run's summary.json, warm-up steps excluded)", "",
         "| backend | ranks | global batch | img/s | img/s per rank | efficiency | data wait |", "|---|---|---|---|---|---|---|"]
lines += [f"| {r['backend']} | {r['ranks']} | {r['global_batch']} | {r['img_per_s']:.1f} | {r['img_per_s_per_rank']:.1f} | "
          f"{r['efficiency']:.2f} | {r['data_wait_frac'] or 0:.2f} |" for r in rows]
(root / f"scaling-{mode}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
}

if [[ ${1:-} == --merge ]]; then
  : "${PYTHON:=python3}"
  merge "${2:-$PHOTOZ_SCALING_DIR}"
  exit
fi

if [[ ${1:-} == --submit ]]; then                  # login node: one job per size, then the merge
  shift
  [[ $# -gt 0 ]] || photoz_die "usage: bash slurm/benchmark_scaling.sh --submit N1 N2 ... (nodes, or ranks with PHOTOZ_SCALING_UNIT=tasks)"
  photoz_load_site
  read -r -a site_opts <<< "${PHOTOZ_SBATCH_ARGS:-}"
  read -r -a own_opts <<< "${PHOTOZ_SCALING_SBATCH:-}"   # e.g. "--time=00:10:00 --partition=gpu"
  ids=()
  for n in "$@"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || photoz_die "sizes must be positive integers, got '$n'"
    if [[ $PHOTOZ_SCALING_UNIT == nodes ]]; then size=(--nodes="$n"); else size=(--nodes=1 --ntasks-per-node="$n"); fi
    id=$(sbatch --parsable "${site_opts[@]}" "${own_opts[@]}" "${size[@]}" slurm/benchmark_scaling.sh)
    ids+=("${id%%;*}")
    echo "size $n: job ${id%%;*}"
  done
  deps=$(IFS=:; echo "${ids[*]}")
  id=$(sbatch --parsable "${site_opts[@]}" --dependency="afterany:$deps" --nodes=1 --ntasks=1 --ntasks-per-node=1 \
    --gpus-per-node=0 "${own_opts[@]}" --wrap "PHOTOZ_SCALING=$PHOTOZ_SCALING bash slurm/benchmark_scaling.sh --merge $PHOTOZ_SCALING_DIR")
  echo "merge: job ${id%%;*} -> $PHOTOZ_SCALING_DIR/scaling-$PHOTOZ_SCALING.md"
  exit 0
fi

[[ -n ${SLURM_JOB_ID:-} ]] || photoz_die "run with --submit N..., --merge DIR, or under sbatch"
photoz_setup
[[ -f $PHOTOZ_CONFIG ]] || photoz_die "PHOTOZ_CONFIG: config $PHOTOZ_CONFIG not found"
[[ -n ${PHOTOZ_DATA:-} ]] && photoz_require_dataset "$PHOTOZ_DATA" PHOTOZ_DATA
ranks=${SLURM_NTASKS:-1}
if [[ $PHOTOZ_SCALING == weak ]]; then batch=$PHOTOZ_BATCH; else
  (( PHOTOZ_GLOBAL_BATCH % ranks == 0 )) || photoz_die "PHOTOZ_GLOBAL_BATCH=$PHOTOZ_GLOBAL_BATCH does not split over $ranks ranks"
  batch=$((PHOTOZ_GLOBAL_BATCH / ranks))
fi
run=$PHOTOZ_SCALING_DIR/$PHOTOZ_SCALING-$PHOTOZ_BACKEND-r$ranks
rm -rf "$run"                                      # a fresh measurement, never a resumed one
overrides=("out_dir=$run" "dist.backend=$PHOTOZ_BACKEND" "train.resume=never" "train.max_steps=$PHOTOZ_STEPS"
           "train.checkpoint_every=1000000" "loader.batch_size=$batch" "train.progress=false")
[[ -n ${PHOTOZ_DATA:-} ]] && overrides+=("data.path=$PHOTOZ_DATA")
photoz_check_config "$PHOTOZ_CONFIG" "${overrides[@]}" "$@"
photoz_stage PHOTOZ_DATA
[[ -n ${PHOTOZ_DATA:-} ]] && overrides+=("data.path=$PHOTOZ_DATA")
photoz_record "$run"
photoz_srun "$run" "$PYTHON" -m photoz_hpc pretrain --config "$PHOTOZ_CONFIG" "${overrides[@]}" "$@"
echo "== $(date -Is) exit code $rc" >> "$run/launch.log"
exit "$rc"
