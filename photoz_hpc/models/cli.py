"""``photoz-hpc import-checkpoint``: the paper authors' released checkpoints as photoz-hpc files; ``photoz-hpc resave``:
any ``torch.save`` file rewritten as plain data (loads with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import argparse
import json

from photoz_hpc.torch_files import TRUST_FLAG, add_trust_pickle_flag


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-checkpoint",
        help="convert the paper authors' released PyTorch checkpoint (SDSS ugriz) into a photoz-hpc file",
        description="Convert a checkpoint of Hayat et al. (2021) (github.com/mahayat/ssl-sky-surveys): a MoCo "
        "pretraining checkpoint becomes an encoder export (as export-encoder writes), a fine-tuned photo-z "
        "model becomes a photo-z model file. Every tensor must map onto our network with the same shape. SDSS "
        "only: the stem takes the 5 bands ugriz and the head the paper's 180 bins over [0, 0.4); the file written "
        "records that survey and grid (it is refused on data of other bands).",
    )
    p.add_argument("src", help="the authors' file, e.g. pretrained_paper_model.pth.tar or photoz_finetuned_model.pth.tar")
    p.add_argument("out", help="output file, e.g. encoder.pt or photoz_model.pt")
    p.add_argument("--transpose-hw", action="store_true",
                   help="transpose every conv kernel so that our (C, H, W) cutouts give the outputs the authors' "
                   "network gives on their loader's (C, W, H) cutouts (np.swapaxes before ToTensor)")
    add_trust_pickle_flag(p)
    p.set_defaults(func=_import)
    r = subparsers.add_parser(
        "resave",
        help="rewrite a .pt file as plain data that loads without running code",
        description="Read SRC (a checkpoint, encoder.pt, photo-z model or any torch.save file) and write it to OUT as "
        "tensors, plain containers and numbers only (numpy arrays become tensors), so that torch.load(weights_only="
        f"True) reads it. A file that holds pickled Python objects needs {TRUST_FLAG}, which unpickles it in full: "
        "only for a file from a source you trust.",
    )
    r.add_argument("src", help="the file to convert")
    r.add_argument("out", help="the plain-data file to write")
    add_trust_pickle_flag(r)
    r.set_defaults(func=_resave)


def _import(args: argparse.Namespace) -> int:
    from photoz_hpc.models.paper_import import import_checkpoint

    report = import_checkpoint(args.src, args.out, transpose_hw=args.transpose_hw, trust_pickle=args.trust_pickle)
    print(json.dumps(report, indent=2))
    return 0


def _resave(args: argparse.Namespace) -> int:
    from photoz_hpc.torch_files import resave

    print(resave(args.src, args.out))
    return 0
