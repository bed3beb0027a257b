"""Weights & Biases logging, opt-in (logging.wandb=true or `--wandb`), from one process per run (rank 0).

One W&B run per training run: its id comes from train.run_name, so a restarted or re-run training run
appends to the same W&B run. It logs the resolved config, every report's metrics at its step, and the
eval samples as a table. Mode: logging.wandb_mode, else WANDB_MODE, else online when an API key is
configured (WANDB_API_KEY or `wandb login`) and offline otherwise; an online start that cannot reach W&B
falls back to offline. Offline runs land under the run folder; `wandb sync` uploads them later.

Nothing secret is logged: the config holds no keys, and the API key stays with wandb itself.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Optional

from raygpt.config import Config


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: Config) -> str:
    return cfg.logging.wandb_mode or os.environ.get("WANDB_MODE") or ("online" if _api_key_configured() else "offline")


def wandb_run_id(run_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


class WandbLogger:
    """log(metrics) at every report, sample(step, text) at every eval, finish() at the end."""

    def __init__(self, cfg: Config, directory: Optional[Path], print_fn=print):
        import wandb  # only when asked for

        self._wandb = wandb
        directory = Path(directory) if directory is not None else Path.cwd()
        directory.mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name or cfg.train.run_name,
                      id=wandb_run_id(cfg.train.run_name), resume="allow", group=cfg.logging.wandb_group,
                      config=cfg.to_dict(), dir=str(directory),
                      reinit="create_new")  # a Tune driver keeps one run per running trial
        mode = wandb_mode(cfg)
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
        except Exception as e:  # noqa: BLE001 (no network, W&B down, a bad key: train anyway, offline)
            if mode == "offline":
                raise
            print_fn(f"wandb: cannot start an online run ({type(e).__name__}); logging offline instead")
            mode = "offline"
            self.run = wandb.init(mode=mode, settings=wandb.Settings(silent=True), **kwargs)
        self.mode = mode
        self._samples: list[list] = []
        if mode == "offline":
            print_fn(f"wandb: offline run in {self.run.dir.rsplit('/files', 1)[0]}; upload it with `wandb sync` on "
                     f"that folder")

    def log(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics["step"]))

    def sample(self, step: int, text: str) -> None:
        self._samples.append([step, text])
        # A W&B table is fixed once logged: log the whole table again, one row more.
        self.run.log({"samples": self._wandb.Table(columns=["step", "sample"], data=list(self._samples))}, step=step)

    def finish(self, teardown: bool = True) -> None:
        self.run.finish()
        # finish() can return before W&B's service has written the run's .wandb file (it buffers it to the
        # end): tearing the service down waits for that, so the offline run is whole once we return. A
        # process with other runs still open passes teardown=False and tears down after the last one.
        if teardown:
            self._wandb.teardown()
