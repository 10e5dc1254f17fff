"""Commands ``prepare``, ``verify`` and ``info``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="convert release or Multimodal Universe HDF5 files into a sharded binary store",
        description="Stream HDF5 files into fixed-record shards with a manifest that records the survey. Release-"
        "layout files (images, e_bv, ObjID, ...) are SDSS unless --survey names another description; Multimodal "
        "Universe image samples (object_id, image_array, image_band, image_scale) get the survey whose band labels "
        "and pixel scale they carry (docs/surveys.md). "
        "Runs in parallel when launched under mpirun/srun; an interrupted run resumes.",
    )
    p.add_argument("inputs", nargs="+", help="input HDF5 files, or directories of them (MMU <sample>/healpix=N/*.hdf5)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--samples-per-shard", type=int, default=4096, help="records per shard (default 4096)")
    p.add_argument("--bad-rows", choices=["reject", "skip"], default="reject", help="NaN/inf rows: fail (default) or skip and count")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows read from HDF5 at a time (bounds memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset (after the new one is complete)")
    p.add_argument("--mpi", choices=["auto", "mpi", "serial"], default="auto", help="use MPI (auto: if launched by mpirun/srun)")
    p.add_argument("--survey", default=None, metavar="NAME|FILE",
                   help="survey description (sdss, legacy, hsc, lsst or a YAML file); default: SDSS for release-layout "
                   "files, the matching shipped description for Multimodal Universe files")
    p.add_argument("--bands", default=None, metavar="B1,B2,...",
                   help="keep these bands, in this order (e.g. g,r,z); default: all bands of the files")
    p.add_argument("--no-extinction", action="store_true",
                   help="MMU files without EBV/ebv or a_<band> columns: store E(B-V) = 0 (recorded in the manifest)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="MMU: redshift labels from a CSV or Parquet table with object_id and --redshift-key columns, "
                   "joined on object_id (replaces the files' z_spec)")
    p.add_argument("--redshift-key", default="z_spec", help="redshift column of --labels (default z_spec)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="record dtype: float32 (default; bit copies of the inputs) or float16 (half the bytes to read "
                   "and stage; pixels float16 cannot hold are refused, docs/data_format.md)")
    p.set_defaults(func=_prepare)

    v = sub.add_parser("verify", help="re-check every shard checksum and record count", description="Verify a prepared dataset.")
    v.add_argument("dataset", help="dataset directory")
    v.set_defaults(func=_verify)

    i = sub.add_parser("info", help="summarise a dataset (counts, redshift range, pixel stats)",
                       description="Summarise a prepared dataset directory (the store 'photoz-hpc prepare' makes from "
                       "release HDF5 files; not the HDF5 file itself).")
    i.add_argument("dataset", help="prepared dataset directory (photoz-hpc prepare FILE.h5 --out DIR)")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=_info)


def _prepare(args: argparse.Namespace) -> int:
    from photoz_hpc.comm.select import prepare_comm
    from photoz_hpc.data.prepare import prepare

    if args.chunk_rows < 1:
        from photoz_hpc.errors import PhotozError

        raise PhotozError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    from photoz_hpc.data.inputs import PrepareOptions

    bands = tuple(b.strip() for b in args.bands.split(",")) if args.bands else None
    if bands is not None and (not all(bands) or len(set(bands)) != len(bands)):
        from photoz_hpc.errors import PhotozError

        raise PhotozError(f"--bands {args.bands!r} must list distinct band names separated by commas")
    options = PrepareOptions(args.survey, bands, args.no_extinction, args.labels, args.redshift_key, args.dtype)
    comm = prepare_comm(args.mpi)
    out = prepare(args.inputs, args.out, args.samples_per_shard, args.bad_rows, args.chunk_rows, args.overwrite, comm,
                  options)
    if comm.rank == 0:
        print(out)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from photoz_hpc.data.verify import verify_dataset

    report = verify_dataset(args.dataset)
    if report["partial"]:
        print(f"OK (partial copy): {report['partial']} ({report['path']}); survey {report['survey']}, bands "
              f"{' '.join(report['bands'])}, {report['dtype']} records")
        return 0
    print(f"OK: {report['count']} samples in {report['shards']} shards verified ({report['path']}); "
          f"survey {report['survey']}, bands {' '.join(report['bands'])}, {report['dtype']} records")
    return 0


def _info(args: argparse.Namespace) -> int:
    from photoz_hpc.data.verify import dataset_info

    info = dataset_info(args.dataset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
