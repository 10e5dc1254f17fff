"""``finetune_and_evaluate``: fine-tune, then evaluate the best network; shared by ``finetune``, sweeps and the quickstart."""

from __future__ import annotations

from pathlib import Path


def finetune_and_evaluate(cfg) -> dict:
    """Fine-tune, then evaluate the best network on the validation set (collective); the summary gains 'eval'."""
    from photoz_hpc.evaluate.run import evaluate_network, load_network
    from photoz_hpc.io_utils import atomic_write_json
    from photoz_hpc.run_lock import RunDir
    from photoz_hpc.train.finetune import run_finetune_on, select_data
    from photoz_hpc.train.runtime import run_with_comm

    def body(cfg, comm, device, flag):
        summary = run_finetune_on(cfg, comm, device, flag)
        if summary["preempted"] or (summary.get("already_finished") and "eval" in summary):
            return summary  # a finished run started again: nothing to do, nothing written
        best = Path(comm.broadcast_object(summary.get("best_model")))
        net, _, meta = load_network(best)
        data = select_data(cfg)
        # the digest of the bytes evaluated: export-model credits these metrics to that version of the file only
        report = evaluate_network(net, cfg, data.val, comm, device, Path(cfg.out_dir) / "eval", data.val_ids,
                                  title=f"{Path(cfg.out_dir).name}: best network on the validation set",
                                  command="finetune", extra={"checkpoint": str(best.resolve()),
                                                             "checkpoint_sha256": meta["checkpoint_sha256"]})
        summary.pop("already_finished", None)  # trained before, its evaluation missing: done now
        summary["eval"] = {"metrics": {k: v for k, v in report["metrics"].items() if k != "per_bin"},
                           "dir": str(Path(cfg.out_dir) / "eval")}
        if comm.rank == 0:
            atomic_write_json(Path(cfg.out_dir) / "summary.json", summary)
        return summary

    return run_with_comm(cfg, None, body, hold=RunDir(Path(cfg.out_dir), "finetune"), interrupt=True)
