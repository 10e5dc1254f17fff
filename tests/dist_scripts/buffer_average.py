"""Fine-tuning's BatchNorm-statistics average over 2 gloo ranks: one all-reduce per dtype (counted), the same
values as one all-reduce per buffer, every rank the same buffers."""

from __future__ import annotations

import argparse
import copy
import json

import torch

from photoz_hpc.comm.select import init_comm
from photoz_hpc.config import load_config
from photoz_hpc.models.photoz_net import build_photoz_net
from photoz_hpc.train.finetune import average_buffers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    comm = init_comm("torch", 60.0, "cpu")
    torch.manual_seed(0)
    net = build_photoz_net(load_config(None, ["model.arch=resnet18", "model.width=8"]).model)
    g = torch.Generator().manual_seed(100 + comm.rank)  # each rank saw other galaxies
    for buf in net.buffers():
        if buf.is_floating_point():
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    own = torch.cat([b.flatten() for b in net.buffers() if b.is_floating_point()])
    per_buffer = copy.deepcopy(net)
    with torch.no_grad():
        for buf in per_buffer.buffers():  # the previous implementation
            if buf.is_floating_point() and buf.numel():
                buf.copy_(comm.allreduce(buf, "mean"))
    calls = []
    inner = comm.allreduce
    comm.allreduce = lambda t, op="sum": calls.append(op) or inner(t, op)
    average_buffers(net, comm)
    flat = torch.cat([b.flatten() for b in net.buffers() if b.is_floating_point()])
    result = {"rank": comm.rank, "calls": calls, "changed": not torch.equal(flat, own),
              "equal": all(torch.equal(a, b) for a, b in zip(net.buffers(), per_buffer.buffers(), strict=True)),
              "flat": flat.tolist()}
    results = comm.allgather_object(result)
    if comm.rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
