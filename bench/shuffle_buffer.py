"""What the Ray path's shuffle buffer does to a short run: the same model trained the same steps on random
windows from everywhere (the `--local` loop) and on the Ray path's stream of units, with the buffer as it
was (4096 windows) and as it is (about 4M tokens of windows), all three judged on the same large val set.

    python bench/shuffle_buffer.py [--seeds 1337,1,2,3] [key=value ...]

Defaults: the demo corpus (the Python standard library, char-level), the tune demo's best model size (6
layers, 6 heads, 192 wide, block 64, batch 12), 450 steps: a tune trial that ASHA lets finish. The Ray path
runs in this process (Ray Train's local mode on a private local cluster), so the buffer size it reads is
set here. Each seed (train.seed: the model's init and the data order) is a round of the three runs. Prints,
per run: its wall time, the units of the train split its windows came from, and the loss on 300 batches of
val and of train windows (fixed, seeded, the same for every run); over several seeds, each kind's mean,
spread and worst val loss. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = ["model.n_layer=6", "model.n_head=6", "model.n_embd=192", "model.block_size=64", "train.batch_size=12",
            "train.max_steps=450", "optim.lr=2.04e-3", "optim.warmup_steps=55", "train.eval_interval=50",
            "train.eval_steps=10", "train.log_interval=50", "train.checkpoint_interval=450",
            "sample.eval_tokens=0", "logging.wandb=false"]


def judge(checkpoint: Path, val_ids, train_ids, block: int, batch: int) -> tuple[float, float]:
    import torch

    import raygpt
    from raygpt.data.windows import fixed_batches

    model = raygpt.load(checkpoint).model.eval()
    losses = []
    for ids in (val_ids, train_ids):
        batches = fixed_batches([ids], len(ids), block, batch, 300, 7)
        with torch.inference_mode():
            losses.append(sum(model(x, y)[1].item() for x, y in batches) / len(batches))
    return losses[0], losses[1]


def main() -> None:
    import pyarrow.parquet as pq
    import ray
    import torch

    import raygpt.data.ingest as ingest
    import raygpt.data.windows as windows
    from raygpt.checkpoint import latest_checkpoint
    from raygpt.cluster import connect_private
    from raygpt.config import load_config
    from raygpt.data.corpus import prepare_arrays
    from raygpt.distributed import train
    from raygpt.local import train_local

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1337", help="train.seed of each round, comma-separated (default 1337)")
    ap.add_argument("overrides", nargs="*", help="key=value, as for jobs/train.py")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="shuffle-"))
    overrides = [*DEFAULTS, f"train.out_dir={out}/runs", f"data.prepared_dir={out}/prepared", *a.overrides]
    cfg = load_config(None, overrides)
    block, batch = cfg.model.block_size, cfg.train.batch_size
    torch.set_num_threads(os.cpu_count() or 1)
    arrays = prepare_arrays(cfg.data, None, print_fn=lambda s: None)
    tokenizer, train_ids, val_ids = arrays
    connect_private()
    seen_units: set = set()
    epoch_batches = ingest.epoch_batches

    def counting(units, *args, **kwargs):  # the units each run's windows come from
        def tap():
            for unit, tokens in units:
                seen_units.add(unit)
                yield unit, tokens
        return epoch_batches(tap(), *args, **kwargs)

    ingest.epoch_batches = counting
    now = windows.SHUFFLE_TOKENS
    names = {"random": "random windows (--local)", 4096 * block: "stream, 4096-window buffer (before)",
             now: "stream, 4M-token buffer (now)"}
    rows = []  # (seed, name, wall, units, val, train)
    for seed in [int(x) for x in a.seeds.split(",")]:
        for kind in names:
            t0 = time.perf_counter()
            run = [*overrides, f"train.seed={seed}", f"train.run_name={kind}-{seed}"]
            if kind == "random":
                checkpoint = train_local(load_config(None, run), arrays=arrays, print_fn=lambda s: None).checkpoint
                units = None
            else:
                windows.SHUFFLE_TOKENS = kind  # what shuffle_windows() reads
                seen_units.clear()
                train(load_config(None, [*run, "ray.local_mode=true", f"ray.cpus_per_worker={os.cpu_count() or 1}"]),
                      print_fn=lambda s: None, quiet=True)
                checkpoint, units = latest_checkpoint(out / "runs" / f"{kind}-{seed}"), len(seen_units)
            wall = time.perf_counter() - t0
            rows.append((seed, names[kind], wall, units, *judge(checkpoint, val_ids, train_ids, block, batch)))
            print(rows[-1], flush=True)
    total_units = sum(pq.ParquetFile(p).num_row_groups for p in (out / "prepared").glob("*/split=train/*.parquet"))

    print(f"\nShuffle buffer, {cfg.train.max_steps} steps of {batch} x {block}, {cfg.model.n_layer}L/{cfg.model.n_head}H/"
          f"{cfg.model.n_embd}, {cfg.data.source} ({tokenizer!r}, {len(train_ids):,} train / {len(val_ids):,} val "
          f"tokens); Ray {ray.__version__}, torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'seed':>6}  {'':38}{'wall':>8}{'units read':>14}{'val loss':>10}{'train loss':>12}")
    for seed, name, wall, units, val, trn in rows:
        where = "-" if units is None else f"{units} / {total_units}"
        print(f"{seed:>6}  {name:38}{wall:>7.0f}s{where:>14}{val:>10.4f}{trn:>12.4f}")
    if len(rows) > len(names):
        print("\nover the seeds, val loss: mean (standard deviation, worst)")
        for name in names.values():
            vals = [r[4] for r in rows if r[1] == name]
            print(f"  {name:38}{statistics.mean(vals):.4f} ({statistics.stdev(vals):.4f}, {max(vals):.4f})")
    print("(val and train loss: the mean over the same 300 seeded batches of each split for every run; wall: the "
          "whole call, the prepare included in the first stream run)")

if __name__ == "__main__":
    main()
