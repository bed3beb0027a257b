"""Ingest: how fast the per-worker data iterator delivers batches, against what the train step consumes.

    python bench/ingest_speed.py [--steps 300] [key=value ...]     # default: the demo config and corpus

For 1 and 2 workers, on one local Ray cluster, side by side in one run:
  - ingest only: each worker pulls --steps * grad-accum batches from the same iterator training uses
    (raygpt.data.ingest.train_batches: Ray Data reads of Parquet row groups, window cutting, the shuffle
    buffer) and does nothing else; tokens/s of the slowest worker;
  - training: a real run of --steps optimizer steps; the train step's tokens/s per worker and
    ``data_wait``, the share of step time spent in next(batches) (the stall fraction), over steps 2..N.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import ray.train  # noqa: E402

from raygpt.config import config_from_dict, grad_accum_steps, load_config  # noqa: E402
from raygpt.cluster import connect_private  # noqa: E402
from raygpt.data.ingest import train_batches  # noqa: E402
from raygpt.distributed import train  # noqa: E402


def ingest_only(config: dict) -> None:
    """Per worker: pull the batches training would, time them, write tokens/s to out_dir/ingest-RANK.json."""
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    n = cfg.train.max_steps * grad_accum_steps(cfg.train, world)
    batches = train_batches(cfg, config["train_unit_tokens"], 0, {}, ray.train.get_dataset_shard("train"),
                            ctx.get_world_rank(), world, ray.train.torch.get_device())
    next(batches)  # the first batch pays the dataset's start-up: not throughput
    t0 = time.perf_counter()
    for _ in range(n - 1):
        next(batches)
    seconds = time.perf_counter() - t0
    rate = (n - 1) * cfg.train.batch_size * cfg.model.block_size / seconds
    Path(cfg.train.out_dir, f"ingest-{ctx.get_world_rank()}.json").write_text(json.dumps(rate))


def main(argv: list[str]) -> None:
    steps = 300
    if "--steps" in argv:
        i = argv.index("--steps")
        steps = int(argv[i + 1])
        del argv[i:i + 2]
    connect_private()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            # One log/eval/checkpoint window covering steps 2..N: its data_wait and tokens/s are the run's.
            cfg = load_config(None, [f"ray.num_workers={workers}", f"train.max_steps={steps}",
                                     f"train.log_interval={steps}", f"train.eval_interval={steps}",
                                     f"train.checkpoint_interval={steps}", f"train.out_dir={tmp}", *argv])
            world_batch = cfg.train.global_batch_size or cfg.train.batch_size
            cfg.train.run_name = f"ingest-{workers}"
            train(cfg, print_fn=lambda s: None, loop=ingest_only)
            ingest = min(json.loads(Path(tmp, f"ingest-{r}.json").read_text()) for r in range(workers))
            cfg.train.run_name = f"train-{workers}"
            m = train(cfg, print_fn=lambda s: None).metrics
            per_worker_step = m["tokens_per_s"] / workers  # tokens/s the step consumes on each worker
            rows.append((workers, world_batch, ingest, per_worker_step, m["data_wait"], m["step_time_ms"]))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"\ningest vs step: {platform.processor() or platform.machine()}, {cpus} CPUs in Ray, ray {ray.__version__}, "
          f"{cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}, block {cfg.model.block_size}, "
          f"batch {cfg.train.batch_size}, {steps} steps, source {cfg.data.source}, tokenizer {cfg.data.tokenizer}")
    print(f"{'workers':>8}{'ingest tok/s/worker':>21}{'step tok/s/worker':>19}{'headroom':>10}{'ms/step':>9}{'data wait':>11}")
    for workers, _, ingest, step, wait, ms in rows:
        print(f"{workers:>8}{ingest:>21,.0f}{step:>19,.0f}{ingest / step:>9.0f}x{ms:>9.1f}{100 * wait:>10.2f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
