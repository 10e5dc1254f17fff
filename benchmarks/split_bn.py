"""Split BatchNorm on channels_last activations: the layout-preserving path against the NCHW copy.

Times forward + backward of one ``SplitBatchNorm2d`` (single-process shuffle-BN, 8 splits) on a
channels_last input, three ways:
  channels_last  the layout-preserving path ``SplitBatchNorm2d`` takes (statistics per (sub-batch, channel)
                 on the NHWC storage, no layout copy), backward in separate ops (moco.split_bn_backward=eager)
  channels_last_fused  the same with the backward under torch.compile (fused; skipped where it cannot compile)
  nchw_copy      the reference reshape: the input copied to NCHW, ``F.batch_norm`` on (N/S, S*C, H, W), the
                 output copied back to channels_last for the next convolution (what the model did before)
  plain_bn       ``nn.BatchNorm2d`` on the same input, no split (the floor: cuDNN's NHWC kernels on a GPU)
Usage: python benchmarks/split_bn.py [--device cuda] [--dtype bf16] [--shape 256,256,64,64] [--iters 20]
       [--json out.json]
The default shape is ResNet-50's widest BatchNorm at the paper's 64x64 crops and per-GPU batch 256
(layer1, 256 channels at full resolution); on a CPU pass a smaller one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nchw_copy(bn, x: torch.Tensor) -> torch.Tensor:
    s = bn.num_splits
    n, c, h, w = x.shape
    rm, rv = bn.running_mean.repeat(s), bn.running_var.repeat(s)
    out = F.batch_norm(x.reshape(n // s, s * c, h, w), rm, rv, bn.weight.repeat(s), bn.bias.repeat(s), True,
                       bn.momentum, bn.eps)
    return out.reshape(n, c, h, w).contiguous(memory_format=torch.channels_last)


def timed(fn, x: torch.Tensor, g: torch.Tensor, iters: int, warmup: int = 3) -> float:
    """Mean seconds of forward + backward over ``iters`` after ``warmup``."""
    cuda = x.is_cuda
    for i in range(warmup + iters):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x.grad = None
        fn(x).backward(g)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--shape", default="256,256,64,64", help="N,C,H,W of the activation")
    ap.add_argument("--splits", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from photoz_hpc.models.resnet import SplitBatchNorm2d

    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, c, h, w = (int(v) for v in args.shape.split(","))
    x = torch.randn(n, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    from photoz_hpc.models.resnet import _fused_available

    split = SplitBatchNorm2d(c, args.splits, backward="eager").to(dev)  # parameters fp32, as under autocast
    fused = SplitBatchNorm2d(c, args.splits, backward="fused").to(dev)
    plain = torch.nn.BatchNorm2d(c).to(dev)
    variants = {"channels_last": split, "channels_last_fused": fused, "nchw_copy": lambda t: nchw_copy(split, t),
                "plain_bn": plain}
    if not _fused_available(dev):
        del variants["channels_last_fused"]
    rows = []
    for name, fn in variants.items():
        sec = timed(fn, x, g, args.iters)
        gbytes = x.numel() * x.element_size() / 1e9
        rows.append({"variant": name, "ms": 1e3 * sec, "activation_gb": gbytes})
        print(f"{name:14s} {1e3 * sec:8.2f} ms forward+backward  ({gbytes:.2f} GB activation, {args.dtype})", flush=True)
    base = rows[0]["ms"]
    for r in rows[1:]:
        print(f"channels_last / {r['variant']}: {base / r['ms']:.2f}x the time")
    setting = {"channels_last": "eager", "channels_last_fused": "fused", "nchw_copy": "copy"}
    best = min((r for r in rows if r["variant"] in setting), key=lambda r: r["ms"])
    print(f"fastest split BN: {best['variant']}: moco.split_bn_backward={setting[best['variant']]}")
    info = {"recommended": f"moco.split_bn_backward={setting[best['variant']]}",
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": args.dtype,
            "shape": [n, c, h, w], "splits": args.splits, "iters": args.iters, "torch": torch.__version__,
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
