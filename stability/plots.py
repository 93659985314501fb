"""Figures, one function per figure type, each taking the results DataFrame.

Bands are +-1 standard error over the group (and seed) replicates.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _mean_se(df: pd.DataFrame, by: list[str], col: str) -> pd.DataFrame:
  g = df.groupby(by)[col]
  out = g.agg(["mean", "std", "count"]).reset_index()
  out["se"] = out["std"].fillna(0) / np.sqrt(out["count"])
  return out


def merged_vs_K(df: pd.DataFrame, path: str | None = None):
  """Merged model's test loss and gap against K, one line per eta (collapse of over-training).

  Uses `kind == 'merged'` rows (one per group x config x K); each line averages the groups and
  the other hyperparameters (b, data ratio) at that eta; bands are +-1 s.e. over groups.
  """
  merged = df[df["kind"] == "merged"]
  # Average over b and data ratio within each group first, so replicates are the groups.
  per_group = merged.groupby(["eta", "K", "group"])[["test_loss", "gap"]].mean().reset_index()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, col, title in zip(axes, ["test_loss", "gap"],
                            ["merged test loss", "merged generalization gap"]):
    for eta, sub in _mean_se(per_group, ["eta", "K"], col).groupby("eta"):
      ax.plot(sub["K"], sub["mean"], marker="o", label=f"eta={eta:g}")
      ax.fill_between(sub["K"], sub["mean"] - sub["se"], sub["mean"] + sub["se"], alpha=0.2)
    ax.set_xlabel("K (steps per expert)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return fig
