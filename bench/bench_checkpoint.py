"""How long a checkpoint save stalls the training step: synchronous DCP save vs `checkpoint.async_save`.

    python bench/bench_checkpoint.py                              # debug_cpu recipe, this machine
    python bench/bench_checkpoint.py --recipe gpu_small --saves 3  # 0.17 B random-weight model on one GPU

Builds the trainer of the recipe in one process (FSDP2 on a world of one, as bench/throughput.py), gives AdamW
its state with one zero-gradient step, then saves `--saves` times in each mode into a temporary folder. Per mode:
`stall_s`, the time `Checkpointer.save` keeps the step waiting (sync: the whole save; async: the CPU copy of
the state and the hand-off), and `total_s`, until COMPLETE (the manifest's SHA-256 included). Prints a line per
mode; the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="debug_cpu")
    ap.add_argument("--saves", type=int, default=3)
    args, overrides = ap.parse_known_args(argv)

    import torch

    from strive_engine.checkpoint import Checkpointer
    from strive_engine.config import load_config
    from strive_engine.parallel import destroy_distributed, init_distributed, seed_everything
    from strive_engine.trainer import build_trainer

    cfg = load_config(["--recipe", args.recipe, "--logging.progress=false", *overrides])
    env = init_distributed(cfg.parallel.backend)
    seed_everything(cfg.run.seed)
    t = build_trainer(cfg, env)
    for p in t.params:  # AdamW state exists after its first step: save what training would save
        p.grad = torch.zeros_like(p)
    t.optim.optimizer.step()
    t.optim.optimizer.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    result = {"recipe": args.recipe, "device": str(env.device), "torch": torch.__version__,
              "params": sum(p.numel() for p in t.params)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            ck = Checkpointer(Path(tmp) / mode, env, keep=1, async_save=mode == "async", config=cfg.to_dict())
            stalls, totals = [], []
            for i in range(args.saves):
                sync()
                t0 = time.perf_counter()
                path = ck.save_trainer(i + 1, t, t.loader.state_dict())
                stalls.append(time.perf_counter() - t0)
                ck.wait()
                totals.append(time.perf_counter() - t0)
            ck.close()
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            result[mode] = {"stall_s": statistics.median(stalls), "total_s": statistics.median(totals),
                            "bytes": size, "saves": args.saves}
            print(f"{mode:>5}: stall {result[mode]['stall_s']:.3f} s, until COMPLETE {result[mode]['total_s']:.3f} s, "
                  f"{size / 2**20:.1f} MiB per checkpoint", flush=True)
    destroy_distributed()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
