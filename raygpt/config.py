"""One typed config for every raygpt run.

Precedence: the defaults below < a partial YAML file < ``key=value`` overrides. Every default lives in
this file and nowhere else. Unknown keys, wrong types and impossible combinations fail before any work
starts, with a message that names the dotted key (``model.n_head``). No torch, no Ray here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config a run cannot start from; the message names the dotted key and what to do."""


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    # None: taken from the tokenizer. Set it to pad the embedding (e.g. 50304 for GPT-2 speed).
    vocab_size: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True


@dataclass
class DataConfig:
    # A named corpus ("python-stdlib", the embedded default) or a path (file, folder, glob).
    source: str = "python-stdlib"
    tokenizer: Literal["char", "bytes", "bpe"] = "char"
    bpe_vocab_size: int = 4096
    # An existing tokenizer.json (e.g. GPT-2's) instead of training one on the corpus.
    tokenizer_path: Optional[str] = None
    val_fraction: float = 0.05
    # "hash": whole documents go to val by a stable hash of their name (corpora of many files).
    # "tail": the last val_fraction of every document is val (nanoGPT's split; single-file corpora).
    split: Literal["hash", "tail"] = "hash"
    # Cap on corpus characters read (None: all); handy for quick experiments.
    max_chars: Optional[int] = None
    # JSONL field / Parquet column that holds the text.
    text_field: str = "text"
    # Files that are not UTF-8 text (or look binary): "skip" them (counted and reported) or "fail".
    on_bad_file: Literal["skip", "fail"] = "skip"
    # Where `raygpt prepare` writes tokenized shards: one folder per fingerprint of sources + settings.
    prepared_dir: str = "data/prepared"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping; the norm is reported either way
    warmup_steps: int = 100
    # Cosine decay ends here (None: at train.max_steps); min_lr is held afterwards.
    decay_steps: Optional[int] = None


@dataclass
class TrainConfig:
    max_steps: int = 1200
    # Sequences per micro-step on one worker.
    batch_size: int = 12
    # Sequences per optimizer step over all workers (None: batch_size x workers). Gradient accumulation
    # is derived from it, so the tokens per step do not change with the worker count.
    global_batch_size: Optional[int] = None
    eval_interval: int = 200
    eval_steps: int = 20
    log_interval: int = 50
    checkpoint_interval: int = 400
    keep_checkpoints: int = 2  # the best N by val loss are kept, and the newest (Ray Train's rule, on every path)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    # Recompute each transformer block in backward instead of keeping its activations (less memory, about
    # a third more compute): for models or batches that do not fit otherwise. Any strategy, and --local.
    activation_checkpointing: bool = False
    # Peak FLOP/s of one device for MFU (None: looked up for known GPUs, no MFU on CPU).
    peak_flops: Optional[float] = None
    out_dir: str = "runs"
    # None: a fresh timestamped run. A name that already has checkpoints resumes from the latest.
    run_name: Optional[str] = None
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    # Start a new run from pretrained weights: a raygpt checkpoint or run folder, a Hugging Face GPT-2 folder,
    # or a hub id (gpt2, ...; downloads). The model's shape and tokenizer come from it; model.block_size may
    # be lowered (the position table is cropped) and model.dropout set. A fresh optimizer and schedule.
    init_from: Optional[str] = None


@dataclass
class RayConfig:
    # 0 runs Ray Train's local mode: the train function in the driver process, no worker actors.
    num_workers: int = 1
    # One worker on a Ray cluster this command started for itself (no RAY_ADDRESS) trains in this process, in
    # local mode: no worker group to start, and no Ray Train actors waking beside the step. None (auto): so;
    # false: a TorchTrainer worker all the same (the run then shows in the dashboard's Train view); true: local
    # mode on any cluster (as ray.num_workers=0).
    local_mode: Optional[bool] = None
    # ddp: every worker holds the whole model, its gradients and optimizer state. fsdp: each holds 1/N of
    # them (FSDP2, one unit per transformer block), gathered block by block as the step needs them.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp only: workers per sharded copy of the model (None: all of them). Smaller than ray.num_workers, it
    # is hybrid sharding (HSDP): shard inside groups of this many (a node's GPUs), replicate across groups.
    fsdp_shard_size: Optional[int] = None
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    # None: the cluster's CPUs shared out over the workers (1 worker on 2 cores gets 2; 2 workers get 1 each).
    cpus_per_worker: Optional[float] = None
    # torch intra-op threads per worker (None: cpus_per_worker, so workers never oversubscribe cores).
    threads_per_worker: Optional[int] = None
    # Where Ray Train keeps runs and checkpoints: a local path or a cloud URI (None: train.out_dir).
    storage_path: Optional[str] = None
    # Worker-group restarts from the latest checkpoint before the run fails: after a worker's error, a lost or
    # preempted node, or a worker group that could not start (each counted up to N on its own).
    max_failures: int = 0
    # Ray Data prefetch per worker, in batches.
    prefetch_batches: int = 2
    # Fault injection, for tests and fire drills: the worker of rank fail_rank exits hard (os._exit) when
    # it starts step fail_at_step, once per run (a marker in the run's storage folder, which must be local,
    # records that it happened). With fail_in=checkpoint it dies instead while writing the checkpoint of
    # that step, after part of it has reached storage.
    fail_at_step: Optional[int] = None
    fail_rank: int = 0
    fail_in: Literal["step", "checkpoint"] = "step"


@dataclass
class SampleConfig:
    prompt: str = "def "
    num_samples: int = 2
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    seed: int = 0
    # Tokens of the sample that rank 0 generates from `prompt` with `seed` at every eval (0: none).
    eval_tokens: int = 80


@dataclass
class LoggingConfig:
    # Weights & Biases (raygpt/tracking.py): rank 0 logs config, metrics and eval samples to one W&B run.
    wandb: bool = False
    wandb_project: str = "raygpt"
    wandb_run_name: Optional[str] = None  # None: train.run_name
    wandb_group: Optional[str] = None
    # None: WANDB_MODE, else online with an API key configured and offline without one.
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None


@dataclass
class FinetuneConfig:
    # full: every weight trains. lora: the weights stay frozen and low-rank adapters on lora.targets train
    # (peft; pip install peft), usually from train.init_from.
    method: Literal["full", "lora"] = "full"


@dataclass
class LoraConfig:
    r: int = 8  # rank of the adapters
    alpha: float = 16.0  # their output is scaled by alpha / r
    dropout: float = 0.0
    # comma-separated module names (c_proj is both the attention's and the MLP's output projection)
    targets: str = "c_attn,c_proj,c_fc"


LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass
class ServeConfig:
    # `raygpt serve` (raygpt/serve/): an OpenAI-compatible server on Ray Serve. Training ignores this section.
    host: str = "127.0.0.1"  # loopback unless told otherwise (0.0.0.0: every interface)
    port: int = 8000
    route_prefix: str = "/"  # where the app is mounted (its web page uses relative URLs)
    replicas: int = 1
    cpus_per_replica: Optional[float] = None  # None: the cluster's CPUs shared out over the replicas
    # Batching policy (continuous): every row in flight decodes in one forward pass per token, up to
    # max_batch_size rows (a request with n choices or a list of prompts is several rows). Rows that arrive
    # while a batch runs join it at the next step (their prompts prefilled beside the running rows' cache);
    # on an idle replica, the first rows wait batch_wait_s for the rest of a burst.
    max_batch_size: int = 16
    batch_wait_s: float = 0.01
    # Overload: requests a replica holds at once (decoding or waiting for a batch); beyond them up to
    # max_queued_requests wait at the proxy, and any more get 503 at once instead of piling up.
    max_ongoing_requests: int = 32
    max_queued_requests: int = 32
    max_tokens_cap: int = 1024  # the most max_tokens a request may ask for (more is a 400 naming the cap)
    default_max_tokens: int = 16  # a request without max_tokens (OpenAI's default)
    # Weights in memory: int8 (dynamic int8 Linear layers, CPU), bf16 or fp16 (GPU); none keeps the checkpoint's.
    quantize: Literal["none", "int8", "bf16", "fp16"] = "none"
    # Move to a better checkpoint of the run (or tune experiment) as training writes it, every follow_interval_s.
    follow: bool = False
    follow_interval_s: float = 5.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


# --------------------------------------------------------------------------- building and checking


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (partial), then ``key=value`` overrides; validated."""
    data = read_yaml(path, "config file", "configs/default.yaml") if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = config_from_dict(data)
    # The keys the user set (train.init_from fills the model keys left unset from the pretrained model).
    cfg.explicit = {f"{section}.{key}" for section, values in data.items() for key in values}
    return cfg


def read_yaml(path: str | Path, what: str, example: str) -> dict:
    """The mapping of sections in the YAML file at ``path``; errors name ``what`` it is and an ``example``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; pass a YAML file such as {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; the value is read as YAML (numbers, true, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (for example model.n_layer=8)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.name (for example optim.lr)")
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]} must be a mapping of settings")
    section[parts[1]] = value


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a (partial) nested dict, as read from YAML."""
    sections = {}
    hints = typing.get_type_hints(Config)
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(f"unknown config section {name!r}; valid sections: {', '.join(hints)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of settings, not {value!r}")
        sections[name] = _build_section(name, hints[name], value)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def _build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {section}.{key}; valid keys in {section}: {', '.join(hints)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; a number is what the user means.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"no coercion for {key}: {tp}")  # a bug in this file, not a user error


def validate(cfg: Config) -> None:
    """Reject impossible combinations; each message names the dotted key."""
    m, d, o, t, s = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.sample

    def positive(key: str, value) -> None:
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")

    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        positive(f"model.{key}", getattr(m, key))
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                          f"choose n_embd as a multiple of n_head")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    if d.tokenizer == "bpe" and d.tokenizer_path is None and d.bpe_vocab_size <= 257:
        raise ConfigError(f"data.bpe_vocab_size={d.bpe_vocab_size} must be above 257 (256 bytes + end-of-text)")
    positive("data.max_chars", d.max_chars)
    positive("optim.lr", o.lr)
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.warmup_steps < 0:
        raise ConfigError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must not be negative")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    for key in ("max_steps", "batch_size", "global_batch_size", "eval_interval", "eval_steps", "log_interval",
                "checkpoint_interval", "keep_checkpoints", "threads", "peak_flops"):
        positive(f"train.{key}", getattr(t, key))
    if o.warmup_steps >= t.max_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is not shorter than the run "
                          f"(train.max_steps={t.max_steps}); lower the warmup or train longer")
    if o.decay_steps is not None and not o.warmup_steps < o.decay_steps:
        raise ConfigError(f"optim.decay_steps={o.decay_steps} must be longer than optim.warmup_steps={o.warmup_steps}")
    if t.global_batch_size is not None and t.global_batch_size % t.batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.batch_size={t.batch_size}")
    if "://" in t.out_dir:
        raise ConfigError(f"train.out_dir={t.out_dir!r} must be a local folder; put cloud storage in "
                          f"ray.storage_path")
    if t.run_name is not None and (not t.run_name or "/" in t.run_name or t.run_name.startswith(".")):
        raise ConfigError(f"train.run_name={t.run_name!r} must be a plain folder name")
    r = cfg.ray
    if r.storage_path is not None and "://" not in r.storage_path and not r.storage_path.startswith("/"):
        raise ConfigError(f"ray.storage_path={r.storage_path!r} must be an absolute path or a URI (s3://, gs://, "
                          f"file://): every node of the cluster resolves it")
    if r.num_workers < 0 or r.max_failures < 0 or r.prefetch_batches < 0:
        raise ConfigError("ray.num_workers, ray.max_failures and ray.prefetch_batches must not be negative")
    if r.local_mode is not None and not isinstance(r.local_mode, bool):
        raise ConfigError(f"ray.local_mode must be true, false or null (auto), got {r.local_mode!r}")
    if r.local_mode and r.num_workers > 1:
        raise ConfigError(f"ray.local_mode=true trains in this process, one worker; ray.num_workers={r.num_workers} "
                          f"needs a worker group: set one of them")
    if r.fail_at_step is not None:
        if not 1 <= r.fail_at_step <= t.max_steps:
            raise ConfigError(f"ray.fail_at_step={r.fail_at_step} must be between 1 and train.max_steps={t.max_steps}")
        if r.num_workers == 0 or r.local_mode:
            raise ConfigError("ray.fail_at_step needs Ray Train workers (ray.num_workers >= 1): in local mode "
                              "the worker is this process, and it would end it")
        if not 0 <= r.fail_rank < r.num_workers:
            raise ConfigError(f"ray.fail_rank={r.fail_rank} is not a worker rank (ray.num_workers={r.num_workers})")
        if r.fail_in == "checkpoint" and r.fail_rank != 0:
            raise ConfigError("ray.fail_in=checkpoint needs ray.fail_rank=0 (rank 0 writes the checkpoints)")
        if r.storage_path and "://" in r.storage_path:
            raise ConfigError("ray.fail_at_step needs a local ray.storage_path (it leaves a marker file there)")
    positive("ray.fsdp_shard_size", r.fsdp_shard_size)
    if r.fsdp_shard_size is not None:
        if r.strategy != "fsdp":
            raise ConfigError(f"ray.fsdp_shard_size={r.fsdp_shard_size} needs ray.strategy=fsdp (it is {r.strategy})")
        if max(1, r.num_workers) % r.fsdp_shard_size:
            raise ConfigError(f"ray.fsdp_shard_size={r.fsdp_shard_size} does not divide ray.num_workers="
                              f"{r.num_workers}: each group of that many workers holds one sharded copy")
    if r.strategy == "fsdp" and (r.num_workers == 0 or r.local_mode):
        raise ConfigError("ray.strategy=fsdp needs Ray Train workers (ray.num_workers >= 1): local mode runs one "
                          "process without a process group to shard over")
    if cfg.finetune.method == "lora":
        lo = cfg.lora
        positive("lora.r", lo.r)
        positive("lora.alpha", lo.alpha)
        if not 0.0 <= lo.dropout < 1.0:
            raise ConfigError(f"lora.dropout={lo.dropout} must be in [0, 1)")
        targets = [x.strip() for x in lo.targets.split(",")]
        if not all(targets) or not set(targets) <= set(LORA_TARGETS):
            raise ConfigError(f"lora.targets={lo.targets!r}: give a comma-separated list of "
                              f"{', '.join(LORA_TARGETS)}")
        if r.strategy == "fsdp":
            raise ConfigError("finetune.method=lora runs under ray.strategy=ddp (or --local): its adapters are a "
                              "small fraction of the model, and FSDP with frozen weights is not supported here yet")
    if r.strategy == "fsdp" and t.precision == "fp16":
        raise ConfigError("ray.strategy=fsdp trains in bf16 or fp32, not fp16 (no sharded GradScaler here): set "
                          "train.precision=bf16 or fp32, or use ray.strategy=ddp on GPUs without bf16")
    positive("ray.cpus_per_worker", r.cpus_per_worker)
    positive("ray.threads_per_worker", r.threads_per_worker)
    v = cfg.serve
    for key in ("port", "replicas", "max_batch_size", "max_ongoing_requests", "max_tokens_cap", "follow_interval_s",
                "cpus_per_replica"):
        positive(f"serve.{key}", getattr(v, key))
    if v.port > 65535:
        raise ConfigError(f"serve.port={v.port} is not a port (1-65535)")
    if v.batch_wait_s < 0 or v.max_queued_requests < -1:
        raise ConfigError("serve.batch_wait_s must not be negative and serve.max_queued_requests must be -1 (no limit) "
                          f"or more, got {v.batch_wait_s} and {v.max_queued_requests}")
    if not 0 <= v.default_max_tokens <= v.max_tokens_cap:
        raise ConfigError(f"serve.default_max_tokens={v.default_max_tokens} must be from 0 to serve.max_tokens_cap="
                          f"{v.max_tokens_cap}")
    if not v.route_prefix.startswith("/"):
        raise ConfigError(f"serve.route_prefix={v.route_prefix!r} must start with / (e.g. /gpt)")
    if s.eval_tokens < 0:
        raise ConfigError(f"sample.eval_tokens={s.eval_tokens} must not be negative (0: no sample at evals)")
    try:
        check_sampling(lambda key: f"sample.{key}", max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, seed=s.seed, num_samples=s.num_samples)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_sampling(name=lambda key: key, *, max_new_tokens: int = 0, temperature: float = 1.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                   num_samples: int = 1) -> None:
    """The rules for sampling settings, in one place for the sample.* keys, TextGenerator.generate and
    `raygpt generate`. ``name`` turns a setting's name into what the user wrote (sample.top_k, --top-k);
    a bad value is a ValueError naming it."""
    def integer(key: str, value, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name(key)}={value!r} must be an integer of at least {low}")

    integer("max_new_tokens", max_new_tokens, 0)
    integer("num_samples", num_samples, 1)
    if top_k is not None:
        integer("top_k", top_k, 1)
    if not temperature >= 0:  # also NaN
        raise ValueError(f"{name('temperature')}={temperature!r} must not be negative (0 is greedy)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{name('top_p')}={top_p!r} must be in (0, 1] (1 keeps every token)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"{name('seed')}={seed!r} must be an integer from 0 to 2**63 - 1")


def grad_accum_steps(train: TrainConfig, world_size: int = 1) -> int:
    """Micro-steps per optimizer step so that every step sees train.global_batch_size sequences."""
    if train.global_batch_size is None:
        return 1
    per_step = train.batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                          f"train.batch_size x workers = {train.batch_size} x {world_size}")
    return train.global_batch_size // per_step
