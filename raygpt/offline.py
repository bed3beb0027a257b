"""Offline generation and evaluation on Ray Data: `raygpt generate CKPT --input IN --output OUT` and
`raygpt eval CKPT --data SOURCE --pairs FILE`.

Prompts (or perplexity windows) are rows of a Ray Data dataset; ``map_batches`` runs them through a fixed
pool of actors, each of which loads the model once and handles a batch per call (generation: one forward
pass per token for the whole batch). Every input is read and checked on the driver before the cluster
is asked for anything: a bad line is one error that names it, and nothing is generated. The pure parts
(reading, checking, scoring, BLEU) are in raygpt/offline_io.py, which does not import Ray.

The checkpoint is read by every actor from its path, so on a cluster of several machines it must be on
storage that all of them see.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

import numpy as np
import ray
import torch

from raygpt.data.sources import count_skipped
from raygpt.distributed import connect
from raygpt.generate import load
from raygpt.offline_io import (EvalJob, GenerateJob, bleu, format_table, output_record,
                               perplexity_result, score_windows, windows, write_atomic)

BLOCKS_PER_ACTOR = 16  # dataset blocks per actor at most: enough to keep every actor busy, few enough to cost little


class Generate:
    """The actor of generation: the model loaded once; each call continues a batch of prompts, row i seeded
    with seed + row (rows: the prompts' 0-based positions), so a text does not depend on its batch."""

    def __init__(self, checkpoint: str, device: Optional[str], threads: int, seed: Optional[int], sampling: dict):
        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not every core of the machine
        self.gen = load(checkpoint, device=device)
        self.seed, self.sampling = seed, sampling

    def __call__(self, batch: dict) -> dict:
        rows = batch["row"]
        seeds = [None if self.seed is None else self.seed + int(r) for r in rows]
        prompts = [str(p) for p in batch["prompt"]]
        texts = self.gen.generate(prompts, seed=seeds, batch_size=max(1, len(prompts)), **self.sampling)
        return {"row": rows, "completion": np.array(texts, dtype=object)}


class Score:
    """The actor of perplexity: the model loaded once; each call scores a batch of windows."""

    def __init__(self, checkpoint: str, device: Optional[str], threads: int):
        torch.set_num_threads(threads)
        self.gen = load(checkpoint, device=device)

    def __call__(self, batch: dict) -> dict:
        nll, tokens = score_windows(self.gen.model, batch["data"], self.gen.precision)
        return {"nll": nll, "tokens": tokens}


def plan_actors(actors: Optional[int], device: Optional[str]) -> dict:
    """The actor pool on this cluster: how many actors, and the CPUs (torch threads) or GPU each gets. None
    actors: one per GPU when on GPUs, else one per CPU. Asking for more than the cluster has is an error
    now (Ray would wait for them forever)."""
    have = ray.cluster_resources()
    gpus, cpus = int(have.get("GPU", 0)), int(have.get("CPU", 0))
    use_gpu = (device or "auto").startswith("cuda") or (device in (None, "auto") and gpus > 0)
    if use_gpu and gpus == 0:
        raise ValueError(f"--device {device}: the Ray cluster has no GPUs; use --device cpu")
    if actors is None:
        actors = gpus if use_gpu else max(1, cpus)
    if actors > (gpus if use_gpu else cpus):
        raise ValueError(f"--actors {actors} needs {actors} {'GPUs' if use_gpu else 'CPUs'} but the Ray cluster has "
                         f"{gpus if use_gpu else cpus}; lower --actors")
    per_actor = 1 if use_gpu else max(1, cpus // actors)
    return {"actors": actors, "num_cpus": per_actor, "num_gpus": 1 if use_gpu else 0}


def actors_text(pool: dict) -> str:
    """'2 actors, 1 CPU each' / '1 actor, 1 GPU'."""
    def count(k: int, word: str) -> str:
        return f"{k} {word}{'s' if k != 1 else ''}"
    n = pool["actors"]
    each = count(1, "GPU") if pool["num_gpus"] else count(pool["num_cpus"], "CPU")
    return f"{count(n, 'actor')}, {each}{' each' if n != 1 else ''}"


def map_pool(ds: ray.data.Dataset, actor: type, pool: dict, batch_size: int, **kwargs) -> ray.data.Dataset:
    """``ds`` through a fixed pool of ``actor`` instances (each built once with ``kwargs``)."""
    return ds.map_batches(actor, batch_size=batch_size, fn_constructor_kwargs={**kwargs, "threads": pool["num_cpus"]},
                          compute=ray.data.ActorPoolStrategy(size=pool["actors"]), num_cpus=pool["num_cpus"],
                          num_gpus=pool["num_gpus"] or None)


def generate_on_ray(checkpoint: str, prompts: list[str], pool: dict, batch_size: int, device: Optional[str],
                    seed: Optional[int], sampling: dict) -> list[str]:
    """The completions of ``prompts``, in their order, exactly one each, from the actor pool."""
    items = [{"row": i, "prompt": p} for i, p in enumerate(prompts)]
    blocks = max(1, min(-(-len(items) // batch_size), BLOCKS_PER_ACTOR * pool["actors"]))
    ds = map_pool(ray.data.from_items(items, override_num_blocks=blocks), Generate, pool, batch_size,
                  checkpoint=checkpoint, device=device, seed=seed, sampling=sampling)
    # Rows come back in whatever order the actors finish; each goes to its prompt's place.
    out: list[Optional[str]] = [None] * len(prompts)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row, text in zip(batch["row"], batch["completion"]):
            if out[int(row)] is not None:
                raise RuntimeError(f"prompt {int(row)} was generated twice")
            out[int(row)] = str(text)
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts got no output (the first: row {missing[0]})")
    return out  # type: ignore[return-value]


def generate_file(job: GenerateJob, actors: Optional[int] = None, device: Optional[str] = None,
                  print_fn: Callable[[str], None] = print) -> int:
    """`raygpt generate CKPT --input IN --output OUT` (``job``: offline_io.plan_generate, every input checked):
    one output line per input line, in the input's order, written atomically. Returns the lines written."""
    connect(print_fn)
    pool = plan_actors(actors, device)
    start = time.perf_counter()
    texts = generate_on_ray(str(job.checkpoint), [r.prompt for r in job.rows], pool, job.batch_size, device,
                            job.seed, job.sampling)
    seconds = time.perf_counter() - start
    write_atomic(job.output, (output_record(r, t) for r, t in zip(job.rows, texts)))
    blank = job.blank_lines
    print_fn(f"generate: {len(job.rows):,} prompts from {job.input}"
             + (f" ({blank} blank line{'s' if blank > 1 else ''} skipped)" if blank else "")
             + f" on {actors_text(pool)}: {sum(len(t) for t in texts):,} characters in {seconds:.1f} s "
             f"({len(job.rows) / seconds:.1f} prompts/s) -> {job.output}")
    return len(job.rows)


def perplexity_on_ray(job: EvalJob, pool: dict, device: Optional[str]) -> dict:
    """Perplexity over every block of job.stream, scored by the actor pool and summed exactly."""
    w = windows(job.stream, job.block_size)
    # Several blocks per actor, so that every actor has work and a slow one does not hold up the end.
    parts = np.array_split(w, max(1, min(len(w) // job.batch_size, BLOCKS_PER_ACTOR * pool["actors"])))
    ds = map_pool(ray.data.from_numpy(parts), Score, pool, job.batch_size, checkpoint=str(job.checkpoint),
                  device=device)
    nll, tokens = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        nll += batch["nll"].tolist()
        tokens += batch["tokens"].tolist()
    if len(tokens) != len(w) or sum(tokens) != len(job.stream) - 1:  # every block scored once, no token lost
        raise RuntimeError(f"scored {len(tokens)} of {len(w)} blocks, {sum(tokens)} of {len(job.stream) - 1} tokens")
    # The order of the blocks does not matter: perplexity_result sums with math.fsum.
    return {"source": job.data, **perplexity_result(nll, tokens, job.block_size),
            **({"skipped": count_skipped(job.skipped)} if job.skipped else {})}


def run_eval(job: EvalJob, actors: Optional[int] = None, device: Optional[str] = None,
             print_fn: Callable[[str], None] = print) -> dict:
    """`raygpt eval` (``job``: offline_io.plan_eval, every input checked and read): perplexity over every
    block of --data and BLEU of the continuations of --pairs against their references, on the actor pool.
    Prints one table, writes it as JSON to job.json_path and returns it."""
    connect(print_fn)
    pool = plan_actors(actors, device)
    report: dict = {"checkpoint": str(job.checkpoint), "step": job.step}
    if job.stream is not None:
        report["perplexity"] = perplexity_on_ray(job, pool, device)
    if job.pair_rows is not None:
        texts = generate_on_ray(str(job.checkpoint), [r.prompt for r in job.pair_rows], pool, job.batch_size,
                                device, job.seed, job.sampling)
        report["bleu"] = {"file": job.pairs, "pairs": len(job.pair_rows),
                          **bleu(texts, [r.reference for r in job.pair_rows]), **job.sampling, "seed": job.seed}
    print_fn(f"eval: {job.checkpoint} (step {job.step}) on {actors_text(pool)}"
             + (f"; --data: {count_skipped(job.skipped)} skipped, e.g. {job.skipped[0].what}" if job.skipped else ""))
    print_fn(format_table(report))
    write_atomic(job.json_path, [json.dumps(report, indent=2, ensure_ascii=False)])
    print_fn(f"json: {job.json_path}")
    return report
