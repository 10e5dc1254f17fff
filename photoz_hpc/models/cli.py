"""``photoz-hpc import-checkpoint``: the paper authors' released checkpoints as photoz-hpc files."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-checkpoint",
        help="convert the paper authors' released PyTorch checkpoint into a photoz-hpc file",
        description="Convert a checkpoint of Hayat et al. (2021) (github.com/mahayat/ssl-sky-surveys): a MoCo "
        "pretraining checkpoint becomes an encoder export (as export-encoder writes), a fine-tuned photo-z "
        "model becomes a photo-z model file. Every tensor must map onto our network with the same shape.",
    )
    p.add_argument("src", help="the authors' file, e.g. pretrained_paper_model.pth.tar or photoz_finetuned_model.pth.tar")
    p.add_argument("out", help="output file, e.g. encoder.pt or photoz_model.pt")
    p.add_argument("--transpose-hw", action="store_true",
                   help="transpose every conv kernel so that our (C, H, W) cutouts give the outputs the authors' "
                   "network gives on their loader's (C, W, H) cutouts (np.swapaxes before ToTensor)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow Python objects besides tensors in SRC (torch.load weights_only=False): "
                   "only for files from a source you trust")
    p.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> int:
    from photoz_hpc.models.paper_import import import_checkpoint

    report = import_checkpoint(args.src, args.out, transpose_hw=args.transpose_hw, trust_pickle=args.trust_pickle)
    print(json.dumps(report, indent=2))
    return 0
