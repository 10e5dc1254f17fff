"""``photoz-hpc predict``, ``catalogue-verify``, ``calibrate`` and ``export-qp``: the survey catalogue.

``predict`` exits with 75 (``EXIT_PREEMPTED``) when a SIGTERM/SIGUSR1 stopped it after a finished part
(re-run, or requeue, and it resumes); ``catalogue-verify`` exits 1 when a galaxy is missing or doubled.
See docs/predict.md.
"""

from __future__ import annotations

import argparse
import json

from photoz_hpc.torch_files import add_trust_pickle_flag


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="photo-z catalogue (pdf summaries per galaxy) of one or many prepared datasets, on all ranks",
        description="Run a fine-tuned network over every galaxy of the datasets and write a catalogue: Parquet "
        "(or HDF5) parts, one per input shard, written atomically by the rank that owns it; a re-run skips "
        "finished parts. Exit code 75: pre-empted after a finished part (re-run to resume).",
    )
    p.add_argument("--checkpoint", required=True, help="best_model.pt, photoz_model.pt or a fine-tuning checkpoint")
    p.add_argument("--data", required=True, nargs="+", help="prepared dataset directories")
    p.add_argument("--out", required=True, help="catalogue directory (created; re-use it to resume)")
    p.add_argument("--format", default="parquet", choices=["parquet", "hdf5"], help="part file format")
    p.add_argument("--pdf", action="store_true", help="also store each galaxy's full pdf (n_bins float16)")
    p.add_argument("--tta", type=int, default=1, help="average the pdf over K exact 90-degree rotations (1-4; "
                   "costs K forward passes)")
    p.add_argument("--temperature", default="1", help="post-hoc temperature T (p ~ p^(1/T)): a number or the "
                   "calibration.json of 'photoz-hpc calibrate'")
    p.add_argument("--batch-size", type=int, default=0, help="galaxies per forward pass (default: 512 on a GPU, 64 on a CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs with native bf16, fp32 on CPU")
    p.add_argument("--block", default=None, metavar="I/N", help="only block I of N of the parts (Slurm array task)")
    p.add_argument("overrides", nargs="*", help="loader/dist/train overrides, e.g. loader.backend=reference")
    add_trust_pickle_flag(p)
    p.set_defaults(func=_predict)

    v = subparsers.add_parser(
        "catalogue-verify",
        help="merge/verify a catalogue: every input galaxy exactly once, every part's checksum; writes manifest.json",
        description="Re-hash every part, check its rows against its input shard (index and the galaxy ids: ObjID, or object_id), report "
        "missing parts, and write manifest.json when the catalogue is complete.",
    )
    v.add_argument("catalogue", help="catalogue directory written by predict (its --out)")
    v.add_argument("--data", nargs="+", default=None, help="the input datasets, if they moved since predict")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=_verify)

    c = subparsers.add_parser(
        "calibrate",
        help="PIT, coverage and reliability of a network's pdfs on labeled galaxies; fit a temperature",
        description="Predict labeled galaxies, fit a temperature on a calibration split and report PIT histogram, "
        "68%/95% coverage and reliability on the disjoint evaluation split, before and after. Writes "
        "calibration.json (pass it to predict --temperature) and calibration.png.",
    )
    c.add_argument("--checkpoint", required=True, help="best_model.pt, photoz_model.pt or a fine-tuning checkpoint")
    c.add_argument("--data", required=True, help="a labeled prepared dataset (e.g. the validation set)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--ids", default=None, help="optional .npy of dataset ids (e.g. a fine-tuning run's val_ids.npy)")
    c.add_argument("--calib-fraction", type=float, default=0.5, help="fraction of the galaxies that fits T")
    c.add_argument("--split-seed", type=int, default=0, help="seed of the calibration/evaluation split (default 0)")
    c.add_argument("--tta", type=int, default=1, help="average the pdf over K exact 90-degree rotations (1-4; "
                   "use the value you will pass to predict)")
    c.add_argument("--batch-size", type=int, default=64, help="galaxies per forward pass (default 64)")
    c.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs with native bf16, fp32 on CPU")
    c.add_argument("overrides", nargs="*", help="loader/dist/train overrides, e.g. loader.backend=reference")
    add_trust_pickle_flag(c)
    c.set_defaults(func=_calibrate)

    q = subparsers.add_parser(
        "export-qp",
        help="write a catalogue's pdfs as a qp Ensemble (histogram over the bin edges) for RAIL",
        description="Needs a catalogue made with 'predict --pdf' and the qp-prob package. OUT's suffix picks qp's "
        "writer (.hdf5, .fits, .pq).",
    )
    q.add_argument("catalogue", help="catalogue directory written by 'predict --pdf'")
    q.add_argument("out", help="output file; its suffix picks the format (.hdf5, .fits, .pq)")
    q.set_defaults(func=_export_qp)


def _predict(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.calibration import read_temperature
    from photoz_hpc.evaluate.catalogue import PredictOptions, run_predict
    from photoz_hpc.launch_env import detect_env
    from photoz_hpc.train.signals import EXIT_PREEMPTED, PreemptionFlag, ignore_preemption

    opts = PredictOptions(fmt=args.format, with_pdf=args.pdf, tta=args.tta,
                          temperature=read_temperature(args.temperature), batch_size=args.batch_size,
                          precision=args.precision)
    PreemptionFlag().install()  # a signal during start-up only sets a flag
    report = run_predict(args.checkpoint, args.data, args.out, opts, args.block, args.overrides)
    ignore_preemption()
    if detect_env().rank == 0:
        print(json.dumps({k: v for k, v in report.items() if k != "ranks"}, indent=2))
    return EXIT_PREEMPTED if report["preempted"] else 0


def _verify(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.catalogue import verify_catalogue

    report = verify_catalogue(args.catalogue, args.data)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        state = "OK" if report["ok"] else "FAILED"
        print(f"{report['catalogue']}: {state}: {report['rows']} of {report['expected']} galaxies in "
              f"{report['parts'] - len(report['missing_parts'])} of {report['parts']} parts"
              + (f"; manifest {report['manifest']}" if report.get("manifest") else "")
              + (" (marked incomplete)" if report.get("manifest") and not report["ok"] else ""))
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if report["ok"] else 1


def _calibrate(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.calibration import run_calibrate
    from photoz_hpc.launch_env import detect_env

    report = run_calibrate(args.checkpoint, args.data, args.out, args.ids, args.calib_fraction, args.split_seed,
                           args.tta, args.batch_size, args.precision, args.overrides)
    if detect_env().rank == 0:
        keys = ("pit_ks", "coverage_68", "coverage_95", "nll")
        print(json.dumps({"temperature": report["temperature"], "n_calib": report["n_calib"],
                          "n_eval": report["n_eval"], "before": {k: report["before"][k] for k in keys},
                          "after": {k: report["after"][k] for k in keys}, "figure": report["figure"]}, indent=2))
    return 0


def _export_qp(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.qp_export import export_qp

    print(export_qp(args.catalogue, args.out))
    return 0
