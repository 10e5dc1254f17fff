"""The sweep commands: ``finetune --sweep`` (run tasks), ``sweep-plan`` (list them) and ``sweep-report``.

Kept apart from ``sweep`` (the plan: tasks, configs, states) so that the report, which reads plans, and the
commands, which run and report, import the plan without importing each other.
"""

from __future__ import annotations

import argparse
import json

from photoz_hpc.errors import ConfigError
from photoz_hpc.launch.sweep import STATES, check_paths, fraction_name, load_sweep, run_sweep, task_configs, task_state


def run_sweep_command(args: argparse.Namespace) -> int:
    """The ``finetune`` command with ``--sweep`` (called from ``photoz_cli``)."""
    from photoz_hpc.launch_env import detect_env
    from photoz_hpc.logs import setup_logging
    from photoz_hpc.train.signals import PreemptionFlag, ignore_preemption

    if args.config:
        raise ConfigError("--sweep takes the fine-tuning config from the sweep file's 'finetune_config': drop --config")
    if args.overrides:
        raise ConfigError(f"--sweep takes no key=value overrides ({args.overrides}): put them in the sweep file's "
                          "'overrides', so that every task and every resubmission gets the same config")
    if args.task_id is None:
        raise ConfigError("--sweep needs --task-id N (one task; photoz-hpc sweep-plan lists them) or --task-id all")
    setup_logging(args.log_level, rank=detect_env().rank)
    PreemptionFlag().install()
    code, outcomes = run_sweep(args.sweep, args.task_id)
    ignore_preemption()
    if detect_env().rank == 0:
        print(json.dumps(outcomes, indent=2))
    return code



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep-plan", help="list the tasks of a label-fraction sweep (the job array's size)",
        description="Print every task of a sweep file (index, method, label fraction, seed, directory, state) and "
        "their number N: submit a job array with --array=0-(N-1) running 'photoz-hpc finetune --sweep FILE "
        "--task-id $SLURM_ARRAY_TASK_ID'. Order: method-major, then fraction, then seed.")
    p.add_argument("sweep", help="sweep YAML file (e.g. configs/sweep.yaml)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--produced", action="append", default=[], metavar="PATH",
                   help="an input (dataset or encoder) that an upstream job of the same chain will write: not "
                   "required to exist yet (repeatable). Every other dataset and encoder must exist")
    p.set_defaults(func=_plan_command)
    r = subparsers.add_parser(
        "sweep-report", help="gather a sweep's metrics: CSV, the paper's Figure 2, labels saved, report.md",
        description="Collect the validation (or test) metrics of every finished task under RUNS_DIR into CSV files, "
        "draw sigma_MAD and eta against label fraction per method (mean and spread over seeds) and the labels-saved "
        "curve (the supervised label fraction reaching each SSL point's sigma_MAD), and write report.md. Missing and "
        "unfinished tasks are listed.")
    r.add_argument("runs_dir", help="the sweep's runs_dir")
    r.add_argument("--sweep", default=None, help="the sweep file (default: RUNS_DIR/sweep.json, written by the runs, "
                   "else every method/fraction/seed directory found)")
    r.add_argument("--out", default=None, help="output directory (default RUNS_DIR/report)")
    r.set_defaults(func=_report_command)


def _plan_command(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    rows, pending = [], []
    for task, cfg in task_configs(sweep):
        state, detail = task_state(sweep, task, cfg)
        rows.append({"index": task.index, "method": task.method, "fraction": task.fraction, "seed": task.seed,
                     "dir": str(task.dir), "state": state, "detail": detail})
        if state != "finished":
            pending.append((task, cfg))
    check_paths(sweep, pending, tuple(args.produced))
    n = len(rows)
    if args.json:
        print(json.dumps({"sweep": str(sweep.path), "n_tasks": n, "array": f"0-{n - 1}", "tasks": rows}, indent=2))
        return 0
    print(f"{'task':>5}  {'method':<13}{'fraction':>9}  {'seed':>4}  {'state':<11} dir")
    for r in rows:
        print(f"{r['index']:>5}  {r['method']:<13}{fraction_name(r['fraction']):>9}  {r['seed']:>4}  {r['state']:<11} {r['dir']}"
              + (f"  ({r['detail']})" if r["detail"] else ""))
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    print(f"{n} tasks ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}); "
          f"job array: sbatch --array=0-{n - 1} ...  (photoz-hpc finetune --sweep {sweep.path} --task-id N)")
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from photoz_hpc.launch.sweep_report import write_sweep_report

    result = write_sweep_report(args.runs_dir, args.sweep, args.out)
    print(json.dumps(result, indent=2))
    return 0
