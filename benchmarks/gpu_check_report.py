"""The GPU check's small Python parts (``benchmarks/gpu_check.sh``): one line of detail per step.

  env OUT.json                 record GPU, torch/CUDA, native bf16, DALI, Horovod; exit 3 without a CUDA device
  pretrain SUMMARY STEPS k=v   one pretraining run: img/s end to end and compute-only (global batch / (step
                               time - data wait)), data wait, precision, memory format, backend, loss; exit 1
                               unless it trained STEPS steps, each k=v matches the summary, a GPU run timed its
                               data wait with CUDA events (the GPU's idle time: true without host syncs), and the
                               exported encoder (if any) holds CPU, contiguous tensors
  loader JSON | split_bn JSON  the benchmark's figures in one line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def env(out: str) -> int:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    for mod in ("nvidia.dali", "horovod"):
        try:
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            info[mod] = None
    if torch.cuda.is_available():
        from photoz_hpc.train.precision import native_bf16_supported

        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    bf16_native=native_bf16_supported(), cudnn=torch.backends.cudnn.version())
    Path(out).write_text(json.dumps(info, indent=1))
    if not info["cuda_available"]:
        print(f"no CUDA device (torch {info['torch']}, CUDA {info['cuda']})")
        return 3
    print(f"{info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, bf16 native {info['bf16_native']}, "
          f"DALI {info['nvidia.dali']}, Horovod {info['horovod']}")
    return 0


def pretrain(path: str, steps: str, *expect: str) -> int:
    s = json.loads(Path(path).read_text())
    st = s.get("step_time_s") or {}
    compute = s["global_batch"] / (st["step_s"] - st["data_s"]) if st else float("nan")
    clock = s.get("data_wait_clock")
    print(f"{s['img_per_s'] or 0:.0f} img/s, compute-only {compute:.0f} img/s, data wait "
          f"{100 * (s['data_wait_frac'] or 0):.0f}% ({clock}), {s['precision']}, {s['memory_format']}, {s['backend']}, "
          f"loss {s['first_step_loss']:.2f} -> {s['last_loss']:.2f}")
    bad = [f"{k}={s.get(k)} (expected {v})" for k, v in (e.split("=", 1) for e in expect) if str(s.get(k)) != v]
    if str(s.get("device", "")).startswith("cuda") and clock != "cuda events":
        bad.append(f"data wait timed with the {clock} on a GPU: the compute-only figure would be where the host blocks")
    if s["steps"] != int(steps) or s["preempted"]:
        bad.append(f"trained {s['steps']} of {steps} steps")
    if s.get("encoder"):  # loadable on any machine: CPU, contiguous tensors
        import torch

        blob = torch.load(s["encoder"], weights_only=True)
        if not all(t.device.type == "cpu" and t.is_contiguous() for t in blob["state_dict"].values()):
            bad.append("encoder.pt holds non-CPU or non-contiguous tensors")
    if bad:
        print("; ".join(bad))
        return 1
    return 0


def loader(path: str) -> int:
    runs = json.loads(Path(path).read_text())["runs"]
    print(", ".join(f"{r['name']} {r['samples_per_s']:.0f} samples/s" for r in runs))
    return 0


def split_bn(path: str) -> int:
    info = json.loads(Path(path).read_text())
    print(", ".join(f"{r['variant']} {r['ms']:.1f} ms" for r in info["runs"]) + f" ({info['dtype']}, fwd+bwd)"
          + (f"; use {info['recommended']}" if info.get("recommended") else ""))
    return 0


if __name__ == "__main__":
    commands = {"env": env, "pretrain": pretrain, "loader": loader, "split_bn": split_bn}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    sys.exit(commands[sys.argv[1]](*sys.argv[2:]))
