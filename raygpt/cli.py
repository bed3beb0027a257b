"""`raygpt prepare|train|tune|generate ...`: the command line, and what jobs/*.py call.

    raygpt train configs/default.yaml model.n_layer=6 optim.lr=3e-4
    raygpt generate runs/NAME "def main(" --max-new-tokens 100 --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from raygpt.checkpoint import CheckpointError
from raygpt.config import Config, ConfigError, load_config


def split_config_args(args: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``[CONFIG] [key=value ...]``: the first argument is a config file unless it is an override."""
    args = list(args)
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def print_samples(checkpoint, cfg: Config, print_fn=print) -> None:
    """Generate cfg.sample.num_samples texts from the checkpoint and print them."""
    from raygpt.generate import load

    gen = load(checkpoint, device="cpu" if cfg.train.device == "cpu" else None)
    s = cfg.sample
    for i in range(s.num_samples):
        text = gen.generate(s.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, seed=s.seed + i)
        print_fn(f"\n--- sample {i + 1} (prompt {s.prompt!r}) ---\n{s.prompt}{text}")


def cmd_train(argv: Sequence[str]) -> int:
    """On Ray (a TorchTrainer over prepared shards) unless --local: this process, no Ray. Ends with
    samples from the last checkpoint and where it is."""
    local = "--local" in argv
    path, overrides = split_config_args([a for a in argv if a not in ("--local", "--wandb")])
    cfg = load_config(path, overrides + (["logging.wandb=true"] if "--wandb" in argv else []))
    if local:
        from raygpt.local import train_local

        checkpoint = train_local(cfg).checkpoint
    else:
        import ray.train

        from raygpt.distributed import train  # imports Ray: only on this path
        from raygpt.runs import error_line, name_run

        name_run(cfg)  # named here, so a failure can say which run to resume
        try:
            result = train(cfg)
        except ray.train.TrainingFailedError as e:
            # Ray's error says what died; say what it means for the run and how to go on.
            print(f"raygpt train: the run {cfg.train.run_name!r} failed: {error_line(e)} (ray.max_failures="
                  f"{cfg.ray.max_failures} restarts allowed). Its checkpoints are kept; the same command "
                  f"resumes from the newest. Details above.", file=sys.stderr)
            return 1
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if checkpoint is None:
        print("raygpt train: the run wrote no checkpoint", file=sys.stderr)
        return 1
    print_samples(checkpoint, cfg)
    print(f"\ncheckpoint: {checkpoint}")
    print(f"load it:    raygpt.load({str(checkpoint)!r}).generate({cfg.sample.prompt!r})")
    return 0


def cmd_prepare(argv: Sequence[str]) -> int:
    """Tokenize cfg.data into Parquet shards with Ray Data; prints the prepared folder."""
    path, overrides = split_config_args(argv)
    cfg = load_config(path, overrides)
    from raygpt.distributed import run_prepare

    print(f"prepared: {run_prepare(cfg)}")
    return 0


def cmd_tune(argv: Sequence[str]) -> int:
    """Ray Tune + Optuna + ASHA over a tune config's space; prints the table, best config and checkpoint."""
    p = argparse.ArgumentParser(prog="raygpt tune", description="Search a tune config's space with Ray Tune.")
    p.add_argument("args", nargs="*", metavar="[TUNE_CONFIG] [key=value]",
                   help="a tune config (default configs/tune/default.yaml), then overrides")
    p.add_argument("--samples", type=int, default=None, help="trials in all (tune.samples)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment (tune.experiment, else the latest one)")
    p.add_argument("--wandb", action="store_true", help="one W&B run per trial, grouped by experiment")
    a = p.parse_intermixed_args(argv)  # options may come between or after the key=value overrides
    path, overrides = split_config_args(a.args)
    overrides += [f"tune.samples={a.samples}"] if a.samples is not None else []
    overrides += ["logging.wandb=true"] if a.wandb else []
    from raygpt.tune_space import load_tune_config

    base, settings = load_tune_config(path, overrides)  # every check before Ray starts
    from raygpt.tune import run_tune

    run_tune(base, settings, resume=a.resume)
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="raygpt generate", description="Generate text from a raygpt checkpoint.")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("prompt", nargs="?", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop before this string (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    a = p.parse_args(argv)
    from raygpt.generate import load

    gen = load(a.checkpoint, device=a.device)
    for i in range(a.num_samples):
        seed = None if a.seed is None else a.seed + i
        kwargs = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                      seed=seed, stop=a.stop)
        if a.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(a.prompt)
        if a.no_stream:
            sys.stdout.write(gen.generate(a.prompt, **kwargs))
        else:
            for piece in gen.generate(a.prompt, stream=True, **kwargs):
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "tune": cmd_tune, "generate": cmd_generate}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: raygpt {{{'|'.join(COMMANDS)}}} ...\n"
              "  prepare [CONFIG] [key=value ...] tokenize data.source into Parquet shards (Ray Data)\n"
              "  train [CONFIG] [key=value ...]   train a GPT on Ray (defaults < CONFIG < overrides);\n"
              "                                   --local trains in this process without Ray; --wandb logs to W&B\n"
              "  tune [TUNE_CONFIG] --samples N   search lr, warmup, model size with Ray Tune (see --help)\n"
              "  generate CHECKPOINT [PROMPT]     sample text (see raygpt generate --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        # A user mistake: one line that says what to fix, not a traceback (RAYGPT_DEBUG=1 shows it).
        if os.environ.get("RAYGPT_DEBUG"):
            raise
        print(f"raygpt {argv[0]}: error: {e}", file=sys.stderr)
        return 2


def main_exit() -> None:
    """Console-script entry point: `raygpt ...`."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
