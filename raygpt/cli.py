"""`raygpt prepare|train|tune|generate|eval|serve|export|import-hf|export-hf ...`: the command line, and what jobs/*.py call.

    raygpt train configs/default.yaml model.n_layer=6 optim.lr=3e-4
    raygpt generate runs/NAME "def main(" --max-new-tokens 100 --temperature 0.8 --top-k 50

Every command answers -h/--help with its arguments and the config keys most worth knowing, without
importing Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from raygpt.checkpoint import CheckpointError
from raygpt.config import Config, ConfigError, load_config

# The config keys each command's --help shows (defaults come from raygpt/config.py and tune_space.py).
KEYS = {
    "data.source": "a named corpus (python-stdlib, tinyshakespeare), a file, a folder, a glob or a URI",
    "data.tokenizer": "char, bytes or bpe (trained on the corpus to data.bpe_vocab_size)",
    "data.tokenizer_path": "an existing tokenizer.json (e.g. GPT-2's) instead of training one",
    "data.text_field": "the field of .jsonl/.json records and .parquet rows that holds the text",
    "data.on_bad_file": "skip (and list) or fail on files and JSON records that cannot be read",
    "data.split": "hash: whole documents by a hash of their name; tail: the end of every document",
    "data.val_fraction": "the share of the data that goes to val",
    "data.max_chars": "read at most this many characters (quick experiments)",
    "data.prepared_dir": "where the tokenized shards go",
    "model.n_layer": "transformer blocks",
    "model.n_head": "attention heads (model.n_embd must be a multiple)",
    "model.n_embd": "width",
    "model.block_size": "context length in tokens",
    "model.dropout": "dropout probability",
    "train.max_steps": "optimizer steps",
    "train.batch_size": "sequences per micro-step per worker",
    "train.global_batch_size": "sequences per optimizer step over all workers (gradient accumulation derived)",
    "train.run_name": "none: a new timestamped run; a name with checkpoints resumes it",
    "train.out_dir": "where runs (and tune experiments) go",
    "train.eval_interval": "steps between evals (val loss and a sample)",
    "train.precision": "auto, fp32, bf16 or fp16",
    "train.device": "auto, cpu, cuda, cuda:N or mps (--local)",
    "train.init_from": "start from pretrained weights: a raygpt checkpoint or run, an HF GPT-2 folder or hub id",
    "optim.lr": "peak learning rate",
    "optim.warmup_steps": "linear warmup steps before the cosine decay",
    "ray.num_workers": "Ray Train workers (0: Ray Train's local mode in the driver)",
    "ray.local_mode": "none (auto): one worker on a cluster the command starts trains in this process; false: a worker",
    "ray.strategy": "ddp (each worker holds the whole model) or fsdp (each holds 1/N: FSDP2)",
    "ray.fsdp_shard_size": "fsdp: workers per sharded copy (none: all; fewer: HSDP)",
    "train.activation_checkpointing": "recompute each block in backward (less memory)",
    "ray.cpus_per_worker": "none: the cluster's CPUs shared out over the workers",
    "ray.use_gpu": "none: use GPUs when the cluster has them",
    "ray.storage_path": "where checkpoints go: an absolute path or a URI (none: train.out_dir)",
    "ray.max_failures": "worker-group restarts from the latest checkpoint",
    "finetune.method": "full, or lora: frozen weights, low-rank adapters train (peft)",
    "lora.r": "rank of the LoRA adapters",
    "lora.alpha": "the adapters' output is scaled by alpha / r",
    "lora.targets": "comma-separated: c_attn, c_proj, c_fc",
    "sample.prompt": "the prompt of the samples at every eval and after training",
    "logging.wandb": "log to Weights & Biases (--wandb)",
    "serve.host": "the address to listen on (0.0.0.0: every interface; --host)",
    "serve.port": "the HTTP port (--port)",
    "serve.route_prefix": "where the app is mounted (/gpt: http://HOST:PORT/gpt/)",
    "serve.replicas": "Serve replicas, each with the whole model (--replicas)",
    "serve.max_batch_size": "rows decoded together in one forward pass per token",
    "serve.batch_wait_s": "how long a batch waits for more rows before it starts",
    "serve.max_ongoing_requests": "requests a replica holds at once",
    "serve.max_queued_requests": "requests waiting beyond those; more get 503 at once (-1: no limit)",
    "serve.max_tokens_cap": "the most max_tokens a request may ask for",
    "serve.quantize": "none, int8 (CPU), bf16 or fp16 (GPU) weights (--quantize)",
    "serve.follow": "move to a better checkpoint of the run as training writes it (--follow)",
    "tune.seed": "the Optuna sampler's seed",
    "tune.grace_steps": "steps every trial runs before ASHA may stop it (none: train.eval_interval)",
    "tune.reduction_factor": "ASHA keeps the best 1/reduction_factor at each rung",
    "tune.max_concurrent": "trials at once (none: as many as the cluster holds)",
    "tune.experiment": "none: a new timestamped experiment; a name to --resume",
}
DATA_KEYS = [k for k in KEYS if k.startswith("data.")]
TRAIN_KEYS = ["data.source", "data.tokenizer", *[k for k in KEYS if k.split(".")[0] in ("model", "train", "optim", "ray")],
              "finetune.method", "lora.r", "lora.alpha", "lora.targets", "sample.prompt", "logging.wandb"]
TUNE_KEYS = [k for k in KEYS if k.startswith("tune.")] + ["data.source", "train.max_steps", "train.out_dir",
                                                          "ray.num_workers", "ray.cpus_per_worker"]


class _Exit(Exception):
    """An argument parser's end of a command (help shown, or a usage mistake): main() returns its status."""

    def __init__(self, status: int, message: Optional[str] = None):
        super().__init__(message)
        self.status, self.message = status, message


class _Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line, `raygpt CMD: error: ...`, like every other user mistake."""

    def error(self, message: str):
        raise _Exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def exit(self, status: int = 0, message: Optional[str] = None):
        raise _Exit(status, message)


def command_parser(command: str, description: str, keys: Sequence[str] = (),
                   config: str = "") -> argparse.ArgumentParser:
    """A command's parser; with ``config`` (what the config file is) it takes ``[CONFIG] [key=value ...]``
    anywhere among its options, and its --help lists ``keys`` with their defaults."""
    p = _Parser(prog=f"raygpt {command}", description=description, epilog=keys_help(keys) if keys else None,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        p.add_argument("args", nargs="*", metavar="CONFIG key=value",
                       help=f"{config}, then key=value overrides (defaults < CONFIG < overrides)")
    return p


def keys_help(keys: Sequence[str]) -> str:
    """The --help lines of config keys: key=default and what it is."""
    from raygpt.tune_space import TuneSettings

    defaults = {"tune": TuneSettings(), **{f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}}
    lines = []
    for key in keys:
        section, name = key.split(".")
        value = getattr(defaults[section], name)
        shown = ("none" if value is None else str(value).lower() if isinstance(value, bool)
                 else repr(value) if isinstance(value, str) and (" " in value or not value) else value)
        lines.append((f"{key}={shown}", KEYS[key]))
    width = max(len(k) for k, _ in lines) + 2
    return ("config keys worth knowing (key=default; all of them: raygpt/config.py):\n"
            + "\n".join(f"  {k:<{width}}{text}" for k, text in lines))


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
    p = command_parser("train", "Train a GPT on Ray (a TorchTrainer over prepared data), or in this process with "
                       "--local;\nthen print samples and where the checkpoint is.", TRAIN_KEYS,
                       "a YAML config such as configs/default.yaml")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (logging.wandb=true)")
    a = p.parse_intermixed_args(argv)  # options may come between or after the key=value overrides
    path, overrides = split_config_args(a.args)
    cfg = load_config(path, overrides + (["logging.wandb=true"] if a.wandb else []))
    if a.local:
        from raygpt.local import train_local

        checkpoint = train_local(cfg).checkpoint
    else:
        import ray.train

        from raygpt import IMPORTED_AT
        from raygpt.distributed import RunInterrupted, train  # imports Ray: only on this path
        from raygpt.runs import error_line, name_run

        name_run(cfg)  # named here, so a failure can say which run to resume
        try:
            result = train(cfg, since=IMPORTED_AT)
        except RunInterrupted as e:
            print(f"raygpt train: {e}", file=sys.stderr)
            return 130  # the shell's code for a command ended by Ctrl-C
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
    """Tokenize cfg.data into Parquet shards in Ray tasks; prints the prepared folder."""
    p = command_parser("prepare", "Tokenize data.source into Parquet shards in Ray tasks (reused when the sources\n"
                       "and settings are the same).", DATA_KEYS, "a YAML config such as configs/default.yaml")
    path, overrides = split_config_args(p.parse_intermixed_args(argv).args)
    cfg = load_config(path, overrides)
    from raygpt.distributed import run_prepare

    print(f"prepared: {run_prepare(cfg)}")
    return 0


def cmd_tune(argv: Sequence[str]) -> int:
    """Ray Tune + Optuna + ASHA over a tune config's space; prints the table, best config and checkpoint."""
    p = command_parser("tune", "Search a tune config's space with Ray Tune, Optuna and ASHA. An override tune.X=V\n"
                       "sets a tune setting (raygpt/tune_space.py), any other a training key of every trial.",
                       TUNE_KEYS, "a tune config (default configs/tune/default.yaml)")
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


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: Optional[int], temperature: float,
                      seed: Optional[int], max_new_tokens_help: str) -> None:
    """The sampling options of generate and eval (the rules: TextGenerator.check)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set reaching p, in (0, 1]")
    p.add_argument("--seed", type=int, default=seed, help="the same seed gives the same text; sample i, or the i-th "
                   f"input prompt from 0, gets seed + i (default {'none: a random one' if seed is None else seed})")
    p.add_argument("--stop", action="append", default=None, help="stop before this string (repeatable)")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a mistake is the usual one usage line)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return int(text)


def add_pool_args(p) -> None:
    """The Ray Data actor pool of generate --input and eval."""
    p.add_argument("--actors", type=positive_int, default=None,
                   help="actors, each loading the model once (default: one per CPU of the cluster, or per GPU)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts (or blocks) per actor call (default 32)")


def cmd_generate(argv: Sequence[str]) -> int:
    p = command_parser("generate", "Generate text from a raygpt checkpoint. With --input: one completion per line of\n"
                       "a JSONL file ({\"prompt\": ..., \"id\": ...} per line), on Ray Data with an actor pool.")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("prompt", nargs="?", default=None, help="text to continue (default: empty, a new document)")
    add_sampling_args(p, 200, 0.8, None, "tokens to generate at most (default 200)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to print (default 1)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    batch = p.add_argument_group("batch generation on Ray Data (raygpt.offline)")
    batch.add_argument("--input", metavar="FILE", help="JSONL of prompts, instead of PROMPT")
    batch.add_argument("--output", metavar="FILE", help="JSONL of completions, one per input line, in its order")
    batch.add_argument("--overwrite", action="store_true", help="replace an --output file that exists")
    add_pool_args(batch)
    a = p.parse_args(argv)
    if a.input is not None or a.output is not None:
        return generate_input(p, a)
    if a.overwrite or a.actors is not None or a.batch_size is not None:
        p.error("--overwrite, --actors and --batch-size apply to --input only")
    a.prompt = "" if a.prompt is None else a.prompt
    from raygpt.generate import load

    gen = load(a.checkpoint, device=a.device)
    kwargs = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  stop=a.stop)
    # Every argument checked before the first character is printed (the rules TextGenerator.generate uses).
    gen.check(a.prompt, seed=a.seed, num_samples=a.num_samples, **kwargs,
              name=lambda key: "PROMPT" if key == "prompt" else "--" + key.replace("_", "-"))
    for i in range(a.num_samples):
        kwargs["seed"] = None if a.seed is None else a.seed + i
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


def generate_input(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """`raygpt generate CKPT --input IN --output OUT`: usage checked here, the rest in raygpt.offline."""
    if a.input is None or a.output is None:
        p.error("--input and --output go together: --input FILE --output FILE")
    if a.prompt is not None:
        p.error("--input reads the prompts from its file; give no PROMPT with it")
    if a.num_samples != 1 or a.no_stream:
        p.error("--num-samples and --no-stream apply to one PROMPT, not to --input")
    from raygpt.offline_io import plan_generate

    # Every input checked (the checkpoint, the options, each line) before Ray is imported.
    job = plan_generate(a.checkpoint, a.input, a.output, overwrite=a.overwrite,
                        batch_size=32 if a.batch_size is None else a.batch_size, seed=a.seed,
                        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        stop=a.stop)
    from raygpt.offline import generate_file  # imports Ray

    generate_file(job, actors=a.actors, device=a.device)
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    p = command_parser("eval", "Evaluate a checkpoint on Ray Data (an actor pool, the model loaded once per actor):\n"
                       "perplexity over every block of a corpus (--data) and BLEU of greedy continuations against\n"
                       "references (--pairs). Prints one table and writes it as JSON.")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", metavar="SOURCE", help="held-out text, as data.source: a named corpus, a file, a folder, "
                   "a glob or a URI; every document is scored in non-overlapping blocks of block_size tokens")
    p.add_argument("--max-chars", type=int, default=None, help="read at most this many characters of --data")
    p.add_argument("--text-field", default="text",
                   help="the field of .jsonl/.json/.parquet --data records (default text)")
    p.add_argument("--pairs", metavar="FILE", help='JSONL, one {"prompt": ..., "reference": ...} per line: BLEU '
                   "(sacrebleu) of the continuations against the references")
    p.add_argument("--json", default="eval.json", metavar="OUT", help="the table as JSON (default eval.json, replaced)")
    p.add_argument("--device", default=None, help="the actors' device: auto (default), cpu, cuda")
    add_pool_args(p)
    add_sampling_args(p, None, 0.0, 0, "--pairs: tokens to generate at most (default: the longest reference's)")
    a = p.parse_args(argv)
    if not a.data and not a.pairs:
        p.error("give --data SOURCE (perplexity), --pairs FILE (BLEU), or both")
    from raygpt.offline_io import plan_eval

    # Every input checked and read before Ray is imported.
    job = plan_eval(a.checkpoint, data=a.data, pairs=a.pairs, json_path=a.json,
                    batch_size=32 if a.batch_size is None else a.batch_size, max_chars=a.max_chars,
                    text_field=a.text_field, seed=a.seed, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k, top_p=a.top_p, stop=a.stop)
    from raygpt.offline import run_eval  # imports Ray

    run_eval(job, actors=a.actors, device=a.device)
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    p = command_parser("export", "Write any raygpt checkpoint as a single-file one (model.safetensors; the optimizer\n"
                       "state in trainer_state.pt): a sharded (ray.strategy=fsdp) checkpoint is consolidated\n"
                       "in this one process, no cluster needed.")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="the new checkpoint directory (must not exist)")
    p.add_argument("--weights-only", action="store_true",
                   help="leave the optimizer state out (for inference; a resume from it restarts AdamW's moments)")
    a = p.parse_args(argv)
    from raygpt.checkpoint import export_checkpoint, read_meta

    out = export_checkpoint(a.checkpoint, a.out, weights_only=a.weights_only)
    meta = read_meta(out)
    size = sum(f["bytes"] for f in meta["files"].values())
    print(f"exported: {out} (step {meta['step']}, {size / 1e6:,.1f} MB"
          + (", weights only" if a.weights_only else "") + ")")
    return 0


def cmd_import_hf(argv: Sequence[str]) -> int:
    p = command_parser("import-hf", "Turn a Hugging Face GPT-2 model into a raygpt checkpoint (weights, config, its\n"
                       "byte-level BPE tokenizer). SRC: a folder with config.json, model.safetensors or\n"
                       "pytorch_model.bin, and tokenizer.json or vocab.json + merges.txt; or a hub id\n"
                       "(gpt2, openai-community/gpt2-medium, ...) on a machine with internet.")
    p.add_argument("src", help="an HF GPT-2 folder or hub id")
    p.add_argument("out", help="the new raygpt checkpoint directory (must not exist)")
    a = p.parse_args(argv)
    from raygpt.hf import import_hf

    import_hf(a.src, a.out, print_fn=print)
    return 0


def cmd_export_hf(argv: Sequence[str]) -> int:
    p = command_parser("export-hf", "Write a raygpt checkpoint as a Hugging Face GPT-2 folder that\n"
                       "GPT2LMHeadModel.from_pretrained, AutoTokenizer.from_pretrained and\n"
                       "pipeline('text-generation', model=OUT) open as it is (needs a BPE tokenizer).")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="the new folder (must not exist)")
    a = p.parse_args(argv)
    from raygpt.hf import describe, export_hf

    print(describe(export_hf(a.checkpoint, a.out)))
    return 0


def cmd_serve(argv: Sequence[str]) -> int:
    p = command_parser("serve", "Serve a checkpoint on Ray Serve: an OpenAI-compatible API (POST /v1/completions, GET\n"
                       "/v1/models), a web page for generation at /, batching of concurrent requests. Starts a\n"
                       "local Ray cluster, or joins the one in RAY_ADDRESS. Ctrl-C stops it.",
                       [k for k in KEYS if k.startswith("serve.")])
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint; "
                   "with --follow its best, then the better ones as they come)")
    p.add_argument("args", nargs="*", metavar="CONFIG key=value",
                   help="a YAML config whose serve: section applies, then serve.key=value overrides")
    p.add_argument("--replicas", type=int, default=None, help="replicas (serve.replicas)")
    p.add_argument("--host", default=None, help="address to listen on (serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (serve.port; default 8000)")
    p.add_argument("--quantize", default=None, choices=("none", "int8", "bf16", "fp16"),
                   help="weights in memory: int8 (CPU), bf16, fp16 (GPU) (serve.quantize)")
    p.add_argument("--follow", action="store_true", help="follow the run folder's best checkpoint (serve.follow)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /healthz (better: RAYGPT_API_KEY, "
                   "which ps does not show)")
    a = p.parse_intermixed_args(argv)
    path, overrides = split_config_args(a.args)
    flags = {"replicas": a.replicas, "host": a.host, "port": a.port, "quantize": a.quantize,
             "follow": True if a.follow else None}
    overrides += [f"serve.{k}={v if isinstance(v, str) else str(v).lower()}" for k, v in flags.items() if v is not None]
    cfg = load_config(path, overrides)
    from raygpt.serve.server import run_server

    run_server(a.checkpoint, cfg, api_key=a.api_key or os.environ.get("RAYGPT_API_KEY") or None)
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "tune": cmd_tune, "generate": cmd_generate,
            "eval": cmd_eval, "serve": cmd_serve, "export": cmd_export, "import-hf": cmd_import_hf, "export-hf": cmd_export_hf}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: raygpt {{{'|'.join(COMMANDS)}}} ...\n"
              "  prepare [CONFIG] [key=value ...] tokenize data.source into Parquet shards (Ray tasks)\n"
              "  train [CONFIG] [key=value ...]   train a GPT on Ray (defaults < CONFIG < overrides);\n"
              "                                   --local trains in this process without Ray; --wandb logs to W&B\n"
              "  tune [TUNE_CONFIG] --samples N   search lr, warmup, model size with Ray Tune\n"
              "  generate CHECKPOINT [PROMPT]     sample text; --input IN.jsonl --output OUT.jsonl: on Ray Data\n"
              "  eval CHECKPOINT --data SOURCE    perplexity (--data) and BLEU (--pairs FILE) on Ray Data\n"
              "  serve CHECKPOINT [--port 8000]   an OpenAI-compatible API and a web page on Ray Serve\n"
              "  export CHECKPOINT OUT            a single-file copy of a checkpoint (consolidates a sharded one)\n"
              "  import-hf SRC OUT                a Hugging Face GPT-2 folder (or hub id) as a raygpt checkpoint\n"
              "  export-hf CHECKPOINT OUT         a raygpt checkpoint as a Hugging Face GPT-2 folder\n"
              "raygpt COMMAND --help lists a command's arguments and the config keys worth knowing",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _Exit as e:  # --help, or a usage mistake
        if e.message:
            print(e.message, end="", file=sys.stderr if e.status else sys.stdout)
        return e.status
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
