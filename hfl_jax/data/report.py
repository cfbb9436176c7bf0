"""Partition statistics (per-device label histograms, sizes, KL to the global label
distribution) and a picture of them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hfl_jax.data.stats import KL_EPS, kl_divergence, smooth   # noqa: F401  (re-exported: hfl_jax.data.report.*)
from hfl_jax.data.tasks import DataError


@dataclasses.dataclass(frozen=True)
class PartitionReport:
    """Statistics of a partition.

    Attributes:
      histograms: int64 [n_dev, K], label counts per device.
      sizes: int64 [n_dev], examples per device.
      global_dist: float64 [K], label distribution of the whole training set.
      kl: float64 [n_dev], KL(p_device || p_global) in nats with `eps` smoothing;
        NaN for an empty device (its distribution is undefined).
      eps: the smoothing used: p = (p + eps) / (1 + K * eps) for both distributions.
    """

    histograms: np.ndarray
    sizes: np.ndarray
    global_dist: np.ndarray
    kl: np.ndarray
    eps: float = KL_EPS

    @property
    def mean_kl(self) -> float:
        """Mean KL over non-empty devices."""
        return float(np.nanmean(self.kl)) if np.any(self.sizes > 0) else float("nan")

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable summary."""
        return {"sizes": self.sizes.tolist(), "histograms": self.histograms.tolist(),
                "global_dist": self.global_dist.tolist(), "kl": self.kl.tolist(),
                "mean_kl": self.mean_kl, "eps": self.eps,
                "empty_devices": int(np.sum(self.sizes == 0))}


def partition_report(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int,
                     eps: float = KL_EPS) -> PartitionReport:
    """Label histograms [n_dev, K], sizes [n_dev] and KL(p_device || p_global) [n_dev]."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    hist = np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes)
                     for p in parts]).astype(np.int64)
    sizes = hist.sum(axis=1)
    glob = np.bincount(labels, minlength=num_classes) / max(labels.size, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dev = hist / sizes[:, None]
    kl = np.where(sizes > 0, kl_divergence(np.nan_to_num(dev), glob, eps), np.nan)
    return PartitionReport(hist, sizes, glob, kl, eps)


def plot_partition(report: PartitionReport, path: str | os.PathLike,
                   class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Save a PNG: heat map of label fractions (classes x devices, with sizes) over a bar
    chart of each device's KL to the global distribution. Uses the Agg canvas directly
    (no pyplot global state). Returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_dev, k = report.histograms.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(report.histograms / report.sizes[:, None])
    fig = Figure(figsize=(max(6.0, 0.12 * n_dev + 2.0), 2.5 + 0.3 * k + 2.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_h, ax_s, ax_k = fig.subplots(3, 1, sharex=True,
                                    gridspec_kw={"height_ratios": [max(1.0, 0.3 * k), 0.8, 1.2]})
    im = ax_h.imshow(frac.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                     interpolation="nearest", extent=(-0.5, n_dev - 0.5, k - 0.5, -0.5))
    ax_h.set_yticks(range(k))
    ax_h.set_yticklabels(list(class_names) if class_names is not None else [str(i) for i in range(k)])
    ax_h.set_ylabel("class")
    fig.colorbar(im, ax=[ax_h, ax_s, ax_k], label="fraction of device's data")
    ax_s.bar(np.arange(n_dev), report.sizes, color="gray")
    ax_s.set_ylabel("examples")
    ax_k.bar(np.arange(n_dev), np.nan_to_num(report.kl), color="tab:red")
    ax_k.set_ylabel("KL(p_dev||p_glob)")
    ax_k.set_xlabel("device")
    ax_k.set_xlim(-0.5, n_dev - 0.5)
    fig.suptitle(title or f"{n_dev} devices, mean KL {report.mean_kl:.3f} nats")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
