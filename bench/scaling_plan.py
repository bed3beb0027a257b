"""Scaling plan: memory, communication, speed, checkpoints and data for a config on N GPUs, from formulas.

    python bench/scaling_plan.py CONFIG [key=value ...] [--gpus 64] [--gpus-per-node 8] [--shard-size 8] [--json]

Estimates, not measurements: nothing here runs a model, and no Ray or torch.distributed is started. Every
figure comes from the config and the formulas in docs/scaling.md (which cites their sources); the hardware
figures are flags. `planned_state_bytes` gives the exact bytes a rank holds for fp32 parameters, gradients
and AdamW moments, for tests to compare with a real sharded model (raygpt.parallel.model_state_bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from raygpt.config import Config, ConfigError, grad_accum_steps, load_config

GiB = 2**30
# Llama 3 (arXiv 2407.21783, section 3.3.4): 419 unexpected interruptions in 54 days on 16,384 GPUs;
# per node of 8 GPUs that is one interruption every 16,384 / 8 * 54 * 24 / 419 = 6,335 hours.
LLAMA3_NODE_MTBF_H = 16384 / 8 * 54 * 24 / 419


def param_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of raygpt.model.GPT, tied weights once, in named_parameters() order."""
    h, V, T, b = model.n_embd, model.vocab_size, model.block_size, model.bias
    out = [("transformer.wte.weight", (V, h)), ("transformer.wpe.weight", (T, h))]
    block = [("ln_1.weight", (h,)), ("ln_1.bias", (h,)),  # nn.Linear weights are (out, in)
             ("attn.c_attn.weight", (3 * h, h)), ("attn.c_attn.bias", (3 * h,)),
             ("attn.c_proj.weight", (h, h)), ("attn.c_proj.bias", (h,)),
             ("ln_2.weight", (h,)), ("ln_2.bias", (h,)),
             ("mlp.c_fc.weight", (4 * h, h)), ("mlp.c_fc.bias", (4 * h,)),
             ("mlp.c_proj.weight", (h, 4 * h)), ("mlp.c_proj.bias", (h,))]
    for i in range(model.n_layer):
        out += [(f"transformer.h.{i}.{n}", s) for n, s in block if b or not n.endswith(".bias")]
    out += [("transformer.ln_f.weight", (h,))] + ([("transformer.ln_f.bias", (h,))] if b else [])
    if not model.tie_weights:
        out.append(("lm_head.weight", (V, h)))
    return out


def local_numel(shape: tuple[int, ...], shards: int, index: int) -> int:
    """Elements of shard ``index`` of ``shards`` under FSDP2: dim 0 is cut in chunks of ceil(dim0 / shards)
    (torch.chunk; FSDP2 pads the storage to that size on every rank), so the last shards may hold less."""
    chunk = -(-shape[0] // shards)
    rows = max(0, min(chunk, shape[0] - index * chunk))
    return rows * math.prod(shape[1:])


def planned_state_bytes(cfg: Config, strategy: str, world: int, shard_size: int | None = None, *,
                        rank: int = 0) -> dict:
    """Bytes rank ``rank`` holds for parameters, gradients and AdamW state in fp32 training (what a CPU run
    holds): 4 + 4 + 8 (exp_avg, exp_avg_sq) bytes per element of its parameters. ddp: the whole model.
    fsdp: each parameter's dim-0 chunk of ``shard_size`` shards (None or 0: ``world``; fewer than ``world``
    is HSDP, where rank r holds shard r % shard_size). Rank 0 always holds a full chunk, ceil(dim0 / S) rows,
    the size FSDP2 pads every rank's storage to. Optimizer step counters (0-dim) are not counted."""
    model = getattr(cfg, "model", cfg)
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r} is not one of ddp, fsdp")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} is not a rank of world={world}")
    shards = 1 if strategy == "ddp" else (shard_size or world)
    if world % shards:
        raise ValueError(f"shard_size={shards} does not divide world={world}")
    numel = sum(local_numel(s, shards, rank % shards) for _, s in param_shapes(model))
    return {"numel": numel, "params": 4 * numel, "grads": 4 * numel, "optimizer": 8 * numel,
            "total": 16 * numel, "shards": shards}


def model_figures(m) -> dict:
    """Parameter counts and training FLOPs per token, the formulas of raygpt/model.py."""
    h, L, V, T = m.n_embd, m.n_layer, m.vocab_size, m.block_size
    block = 12 * h * h + (13 * h if m.bias else 2 * h)  # 4 matmuls 12h^2; biases 9h; 2 LayerNorms 2h (+2h)
    root = V * h + T * h + (2 * h if m.bias else h) + (0 if m.tie_weights else V * h)  # wte, wpe, ln_f, head
    matmul = 12 * L * h * h + V * h  # every Linear weight, the head counted even when tied (as GPT does)
    flops = 6 * matmul + 12 * L * h * T  # GPT.flops_per_token: 6N + attention (PaLM, appendix B)
    recompute = 2 * 12 * L * h * h + 4 * L * h * T  # activation checkpointing: the blocks' forward again
    return {"params": L * block + root, "block": block, "root": root, "matmul": matmul,
            "flops_per_token": flops, "flops_per_token_ac": flops + recompute}


def activation_bytes(m, micro_batch: int, checkpointing: bool) -> int:
    """Activations of one micro-step on one GPU, in 16-bit (Korthikanti et al. 2022): per layer
    s*b*h*(34 + 5*a*s/h) bytes; SDPA's flash kernel keeps no (a, s, s) scores, so 34*s*b*h. With every block
    checkpointed: its 2*s*b*h input per layer, plus one block's full set while it is recomputed. The loss:
    logits in bf16 (2*s*b*V) and in fp32 for the cross-entropy (4*s*b*V)."""
    sbh = m.block_size * micro_batch * m.n_embd
    layers = (2 * sbh * m.n_layer + 34 * sbh) if checkpointing else 34 * sbh * m.n_layer
    return layers + 6 * m.block_size * micro_batch * m.vocab_size


def strategies(world: int, shard: int) -> list[tuple[str, str, int]]:
    """(label, strategy, shard size) of the rows to compare: DDP, FSDP over all GPUs, HSDP if it differs."""
    rows = [("DDP", "ddp", 1)]
    if world > 1:
        rows.append((f"FSDP over {world}", "fsdp", world))
    if 1 < shard < world:
        rows.append((f"HSDP {shard} x {world // shard}", "fsdp", shard))
    return rows


def memory_rows(cfg: Config, f: dict, world: int, shard: int, accum: int, micro_batch: int) -> list[dict]:
    """Per-GPU bytes by strategy under bf16 mixed precision as raygpt runs on GPUs (fp32 parameters)."""
    m, P = cfg.model, f["params"]
    rows = []
    for name, strategy, s in strategies(world, shard):
        state = planned_state_bytes(cfg, strategy, world, s)
        if strategy == "ddp":
            # DDP's gradient buckets (Ray's prepare_model leaves gradient_as_bucket_view off): another fp32 copy
            # of the gradients; autocast's bf16 copies of every Linear weight, held from forward to backward.
            extra = (4 * P if world > 1 else 0) + 2 * f["matmul"]
        else:
            # Gathered bf16 units: the root (wte, wpe, ln_f, tied head), which FSDP2 keeps gathered from
            # forward to backward, and two blocks (the current one, the next prefetched); in backward, the
            # root's and one block's unsharded gradients in bf16 and again in fp32 (reduce_dtype).
            # Gradients are reduce-scattered after every micro-step, so they stay sharded (raygpt.train).
            extra = 2 * f["root"] + 2 * 2 * f["block"] + 6 * (f["root"] + f["block"])
        act = {ac: activation_bytes(m, micro_batch, ac) for ac in (False, True)}
        rows.append({"strategy": name, "params": state["params"], "grads": state["grads"],
                     "optimizer": state["optimizer"], "extra": extra, "act": act[False], "act_ac": act[True],
                     "total": state["total"] + extra + act[False], "total_ac": state["total"] + extra + act[True]})
    return rows


def collective(volume: float, group: int, per_node: int, a: argparse.Namespace) -> tuple[float, ...]:
    """(NVLink bytes, InfiniBand bytes per NIC, seconds, seconds if all of ``volume`` crossed the NIC) of a
    ring collective that sends ``volume`` bytes from each GPU of a group with ``per_node`` of its GPUs on each
    node. NCCL runs one ring per NIC, so a NIC carries 1/per_node of what each GPU sends; the slower of the
    two links sets the time."""
    if group <= per_node:
        return volume, 0.0, volume / a.nvlink_gbps / 1e9, 0.0
    ib = volume / per_node
    return volume, ib, max(volume / a.nvlink_gbps, ib / a.ib_gbps) / 1e9, volume / a.ib_gbps / 1e9


def comm_rows(f: dict, world: int, shard: int, accum: int, a: argparse.Namespace) -> list[dict]:
    """Bytes each GPU sends per optimizer step, and their time, by strategy. DDP all-reduces fp32 gradients
    once per step (no_sync on the other micro-steps); FSDP gathers bf16 blocks twice per micro-step (forward,
    backward) and the root once, and reduce-scatters fp32 gradients after every micro-step (they stay
    sharded); HSDP all-reduces its shard across the copies once per step (set_requires_all_reduce)."""
    G, P = a.gpus_per_node, f["params"]
    rows = []
    for name, strategy, s in strategies(world, shard):
        if strategy == "ddp":
            rows.append((name, [collective(2 * (world - 1) / world * 4 * P, world, min(world, G), a)]))
            continue
        gathered = 2 * (2 * (P - f["root"]) + f["root"])  # bf16 bytes gathered per micro-step
        parts = [collective(accum * (s - 1) / s * gathered, s, min(s, G), a),
                 collective(accum * (s - 1) / s * 4 * P, s, min(s, G), a)]  # the reduce-scatters, fp32
        r = world // s
        if r > 1:  # all-reduce of each shard's gradients across the r copies (ranks s apart)
            parts.append(collective(2 * (r - 1) / r * 4 * P / s, r, max(1, min(r, G // s)), a))
        rows.append((name, parts))
    # bf16 bytes of a block's all-gather that each rank contributes: the message size per ring step
    pieces = {name: 2 * f["block"] / s if strategy == "fsdp" else None for name, strategy, s in strategies(world, shard)}
    return [{"strategy": name, "nvlink": sum(p[0] for p in parts), "ib": sum(p[1] for p in parts),
             "seconds": sum(p[2] for p in parts), "ib_seconds_worst": sum(p[3] for p in parts),
             "block_piece": pieces[name]} for name, parts in rows]


def plan(cfg: Config, a: argparse.Namespace) -> dict:
    m, t = cfg.model, cfg.train
    world, G = a.gpus, a.gpus_per_node
    if world > G and world % G:
        raise ConfigError(f"--gpus {world} is not a whole number of nodes of --gpus-per-node {G}")
    shard = a.shard_size or cfg.ray.fsdp_shard_size or min(world, G)
    if world % shard:
        raise ConfigError(f"--shard-size {shard} does not divide --gpus {world}")
    nodes = -(-world // G)
    accum = grad_accum_steps(t, world)
    tokens = t.batch_size * accum * world * m.block_size
    f = model_figures(m)
    ac = t.activation_checkpointing
    compute = {}
    for mfu in a.mfu:
        sec = tokens * f["flops_per_token_ac" if ac else "flops_per_token"] / (world * a.peak_tflops * 1e12 * mfu)
        compute[mfu] = {"step_s": sec, "mfu": mfu * (f["flops_per_token"] / f["flops_per_token_ac"] if ac else 1),
                        "tokens_per_s": tokens / sec, "tokens_per_s_gpu": tokens / sec / world,
                        "run_hours": t.max_steps * sec / 3600, "data_mb_s_node": tokens / sec / nodes * 4 / 1e6}
    weights = 4 * f["params"]
    ckpt = weights + 8 * f["params"]  # model.safetensors (fp32) + trainer_state.pt (AdamW moments, fp32)
    # DDP: rank 0 writes it all. FSDP: every rank writes its own shard (torch.distributed.checkpoint), each node
    # its share, all at once; replicated copies (HSDP) are written once.
    writers = nodes if cfg.ray.strategy == "fsdp" else 1
    write_s = ckpt / (a.ckpt_gbps * 1e9 * writers)
    mtbf_s = a.node_mtbf_hours / nodes * 3600
    interval_s = math.sqrt(2 * write_s * mtbf_s)  # Young (1974); Daly (2006) adds terms that matter when
    mid = compute[a.mfu[len(a.mfu) // 2]]["step_s"]  # the write time nears the MTBF, not here
    comm = comm_rows(f, world, shard, accum, a)
    for r in comm:
        r["share_of_step"] = r["seconds"] / mid
    return {
        "config": a.config, "gpus": world, "gpus_per_node": G, "nodes": nodes, "shard_size": shard,
        "strategy": cfg.ray.strategy, "activation_checkpointing": ac, "checkpoint_interval": t.checkpoint_interval,
        "model": {**{k: f[k] for k in ("params", "block", "root", "matmul", "flops_per_token", "flops_per_token_ac")},
                  "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
                  "vocab_size": m.vocab_size},
        "batch": {"micro_batch": t.batch_size, "grad_accum": accum, "tokens_per_step": tokens},
        "memory": memory_rows(cfg, f, world, shard, accum, t.batch_size),
        "comm": comm,
        "compute": [{"mfu_assumed": k, **v} for k, v in compute.items()],
        "checkpoint": {"bytes": ckpt, "weights_fp32": weights, "weights_bf16": 2 * f["params"],
                       "write_s": write_s, "writer_nodes": writers, "node_mtbf_h": a.node_mtbf_hours, "cluster_mtbf_h": mtbf_s / 3600,
                       "interval_s": interval_s, "interval_steps": interval_s / mid,
                       "config_interval_s": t.checkpoint_interval * mid,
                       # writing, plus on each failure half an interval re-done and the restart itself
                       "overhead": write_s / interval_s + (interval_s / 2 + a.restart_min * 60) / mtbf_s,
                       "config_overhead": write_s / (t.checkpoint_interval * mid)
                       + (t.checkpoint_interval * mid / 2 + a.restart_min * 60) / mtbf_s},
        "assumptions": {k: getattr(a, k) for k in ("nvlink_gbps", "ib_gbps", "peak_tflops", "mfu", "gpu_mem_gib",
                                                   "ckpt_gbps", "node_mtbf_hours", "restart_min")},
    }


def show(p: dict) -> str:
    g = lambda b: f"{b / GiB:,.2f}"  # noqa: E731
    M, B = p["model"], p["batch"]
    out = [f"{p['config']}: {M['n_layer']} layers, {M['n_head']} heads, {M['n_embd']} wide, block {M['block_size']}, "
           f"vocab {M['vocab_size']:,}; {p['gpus']} GPU(s) on {p['nodes']} node(s) of {p['gpus_per_node']}; "
           f"config: ray.strategy={p['strategy']}, train.activation_checkpointing={str(p['activation_checkpointing']).lower()}",
           f"parameters {M['params']:,} (per block {M['block']:,}; wte, wpe, ln_f, head {M['root']:,}); "
           f"FLOPs/token {M['flops_per_token'] / 1e9:.2f} G ({M['flops_per_token_ac'] / 1e9:.2f} G with recompute)",
           f"batch: micro-batch {B['micro_batch']} x {B['grad_accum']} micro-step(s) x {p['gpus']} GPUs = "
           f"{B['tokens_per_step']:,} tokens a step", "",
           f"memory per GPU, GiB (bf16 mixed precision, fp32 parameters; fits: within 90% of "
           f"{p['assumptions']['gpu_mem_gib']:g} GiB, the rest for the CUDA context, NCCL and fragmentation)",
           "| strategy | params | grads | AdamW | gathered/buffers | activations | total | fits | with AC: act. | total | fits |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    fits = lambda b: "yes" if b <= 0.9 * p["assumptions"]["gpu_mem_gib"] * GiB else "no"  # noqa: E731
    for r in p["memory"]:
        out.append(f"| {r['strategy']} | {g(r['params'])} | {g(r['grads'])} | {g(r['optimizer'])} | {g(r['extra'])} | "
                   f"{g(r['act'])} | {g(r['total'])} | {fits(r['total'])} | {g(r['act_ac'])} | {g(r['total_ac'])} | "
                   f"{fits(r['total_ac'])} |")
    A = p["assumptions"]
    out += ["", f"communication per optimizer step, per GPU (NVLink {A['nvlink_gbps']:g} GB/s, InfiniBand "
            f"{A['ib_gbps']:g} GB/s per GPU's NIC)",
            "| strategy | NVLink GB | IB GB per NIC | seconds | share of a step | IB s if all crossed the NIC "
            "| a block's piece per rank |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in p["comm"]:
        out.append(f"| {r['strategy']} | {r['nvlink'] / 1e9:,.2f} | {r['ib'] / 1e9:,.2f} | {r['seconds']:.3f} | "
                   f"{r['share_of_step']:.1%} | {r['ib_seconds_worst']:.3f} | "
                   + (f"{r['block_piece'] / 2**20:,.2f} MiB |" if r["block_piece"] else "- |"))
    out += ["", f"compute per step (peak {A['peak_tflops']:g} TFLOP/s per GPU"
            + (", with recompute: MFU counts model FLOPs only)" if p["activation_checkpointing"] else ")"),
            "| assumed utilization | MFU | step s | tokens/s per GPU | tokens/s cluster | max_steps in hours | data per node MB/s |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in p["compute"]:
        out.append(f"| {c['mfu_assumed']:.0%} | {c['mfu']:.1%} | {c['step_s']:.3f} | {c['tokens_per_s_gpu']:,.0f} | "
                   f"{c['tokens_per_s']:,.0f} | {c['run_hours']:,.1f} | {c['data_mb_s_node']:.2f} |")
    C = p["checkpoint"]
    out += ["", f"checkpoint {C['bytes'] / 1e9:,.1f} GB (weights fp32 {C['weights_fp32'] / 1e9:,.1f} GB + AdamW "
            f"{(C['bytes'] - C['weights_fp32']) / 1e9:,.1f} GB; bf16 weights alone {C['weights_bf16'] / 1e9:,.1f} GB), "
            f"written in {C['write_s']:,.1f} s ({C['writer_nodes']} node(s) writing at {A['ckpt_gbps']:g} GB/s each"
            + (": every rank its own shard)" if C["writer_nodes"] > 1 or p["strategy"] == "fsdp" else ": rank 0 alone)"),
            f"MTBF {C['node_mtbf_h']:,.0f} h per node -> {C['cluster_mtbf_h']:,.0f} h for {p['nodes']} node(s); "
            f"Young/Daly interval sqrt(2 x {C['write_s']:,.0f} s x MTBF) = {C['interval_s'] / 60:,.0f} min = "
            f"{C['interval_steps']:,.0f} steps at the middle MFU, time lost {C['overhead']:.2%} (writes, re-done "
            f"work, {A['restart_min']:g} min a restart); train.checkpoint_interval={p['checkpoint_interval']}: "
            f"{C['config_interval_s'] / 60:,.0f} min, {C['config_overhead']:.2%}"]
    return "\n".join(out)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        sys.exit(f"scaling_plan: {message} (see --help)")


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a YAML config, e.g. configs/gpt2_xl.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--gpus", type=int, help="data-parallel workers (default: ray.num_workers)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--shard-size", type=int, help="HSDP shard group (default: ray.fsdp_shard_size, else a node)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per GPU per direction (H100 SXM: 450)")
    p.add_argument("--ib-gbps", type=float, default=50.0, help="GB/s per GPU's NIC (400 Gb/s InfiniBand: 50)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--mfu", type=float, nargs="+", default=[0.35, 0.45, 0.55], help="assumed utilizations")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (H100: 80, H200: 140)")
    p.add_argument("--ckpt-gbps", type=float, default=1.0,
                   help="GB/s of one node writing checkpoint files: local write, fsync, sha256, Ray's copy to "
                        "storage (DDP: rank 0 writes all; FSDP: every node writes its ranks' shards at once)")
    p.add_argument("--restart-min", type=float, default=10.0, help="minutes from a failure back to training")
    p.add_argument("--node-mtbf-hours", type=float, default=round(LLAMA3_NODE_MTBF_H),
                   help="mean time between interruptions of one node (default: Llama 3's rate)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    for key in ("gpus", "gpus_per_node", "shard_size", "nvlink_gbps", "ib_gbps", "peak_tflops", "gpu_mem_gib",
                "ckpt_gbps", "node_mtbf_hours", "restart_min"):
        if getattr(a, key) is not None and getattr(a, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(a, key)}")
    if not all(0 < u <= 1 for u in a.mfu):
        p.error(f"--mfu values are fractions in (0, 1], got {a.mfu}")
    try:
        cfg = load_config(a.config, a.overrides)
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is not set: pass model.vocab_size=N (e.g. 50304)")
        a.gpus = a.gpus or max(1, cfg.ray.num_workers)
        result = plan(cfg, a)
    except ConfigError as e:
        sys.exit(f"scaling_plan: {e}")
    print(json.dumps(result, indent=1) if a.json else show(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
