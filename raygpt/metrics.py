"""Training figures through Ray's metrics system, for Prometheus and Grafana (this module imports Ray).

Every worker sets one gauge per figure at each report, labelled with the run's name and the worker's rank
under the label names Ray Train's own metrics use (``ray_train_run_name``, ``ray_train_worker_world_rank``),
so one Grafana variable filters raygpt's panels and Ray's Train panels alike. Ray exports them, prefixed
``ray_``, on each node's metrics endpoint (``--metrics-export-port``) in Prometheus' text format, next to
Ray's own series. ``raygpt/grafana/raygpt_dashboard.json`` is a Grafana dashboard of them; connect()
copies it into the head's Grafana provisioning folder when it runs on the head, so a Grafana started the
way Ray's docs say lists it next to Ray's dashboards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ray.util.metrics import Gauge

# report key -> (metric name, description); Ray adds the "ray_" prefix on export.
FIGURES = {
    "step": ("raygpt_step", "optimizer steps done"),
    "loss": ("raygpt_train_loss", "training loss of the last step on this worker (mean over its micro-steps)"),
    "val_loss": ("raygpt_val_loss", "validation loss at the last eval (the same fixed batches every time)"),
    "lr": ("raygpt_learning_rate", "learning rate of the last step"),
    "grad_norm": ("raygpt_grad_norm", "global gradient norm before clipping"),
    "tokens_per_s": ("raygpt_tokens_per_second", "training tokens per second over all workers"),
    "step_time_ms": ("raygpt_step_time_ms", "milliseconds per optimizer step over the last log interval"),
    "data_wait": ("raygpt_data_wait_ratio", "share of step time this worker waited for batches"),
    "mfu": ("raygpt_mfu_ratio", "model FLOPs utilization of one device (GPUs, or with train.peak_flops)"),
}
RUN, RANK = "ray_train_run_name", "ray_train_worker_world_rank"
GRAFANA_DASHBOARD = Path(__file__).parent / "grafana" / "raygpt_dashboard.json"


class RayMetrics:
    """One worker's gauges: ``record(metrics)`` at every report sets the figures the report carries."""

    def __init__(self, run_name: str, rank: int):
        self.tags = {RUN: run_name, RANK: str(rank)}
        self.gauges = {key: Gauge(name, description=description, tag_keys=(RUN, RANK))
                       for key, (name, description) in FIGURES.items()}

    def record(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            if isinstance(metrics.get(key), (int, float)):
                gauge.set(float(metrics[key]), tags=self.tags)


def install_grafana_dashboard(session_dir: str | Path) -> Path | None:
    """Copy raygpt's dashboard next to Ray's in a head's session folder (Ray's Grafana provisioning reads
    them from there); None where that folder is not on this machine (a driver on another node)."""
    folder = Path(session_dir) / "metrics" / "grafana" / "dashboards"
    if not folder.is_dir():
        return None
    target = folder / GRAFANA_DASHBOARD.name
    shutil.copyfile(GRAFANA_DASHBOARD, target)
    return target
