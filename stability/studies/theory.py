"""The theory side of a study: constants estimated along the run, and measured-vs-bound tables.

  constant_rows            per original expert and K: G_max, L (top Hessian eigenvalue of its
                           training loss) and sigma^2 on its own samples (`theory.constants`);
                           the stability study stores them when `stability.constants` is set
  theory_comparison        measured eps^2 (mean over twins) and gap against the non-convex
                           bounds, with G and L the largest estimates along the trajectory
  merged_gap_comparison    the main job's merged gap against the bound of a simple average
                           (eps^2 / M^2) with the constants config.theory.G and .L

The bounds themselves live in `theory/`; this module only joins stored rows to them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stability import merging
from stability import models as models_lib
from stability import sharding as sharding_lib
from theory import compare as compare_lib
from theory import constants as constants_lib


def params_of(params, E: int):
  """The first E rows (the originals) of a stack, on one device."""
  return sharding_lib.on_one_device(jax.tree.map(lambda a: a[:E], params))


def _expert_constants(model, params, x, y, mask, num_classes, key):
  """(G_max, L, sigma2) of ONE expert on its samples (`theory.constants`)."""
  loss_fn = lambda p, xi, yi: models_lib.per_sample_loss(model, p, xi[None], yi[None],
                                                         num_classes)[0][0]
  gs = constants_lib.gradient_stats(loss_fn, params, x, y, mask)
  he = constants_lib.top_hessian_eigenvalue(loss_fn, params, x, y, key, mask, num_iters=20)
  return gs["G_max"], he["L"], gs["sigma2"]


def constant_rows(ctx, params, originals, K, samples: int, seed: int) -> list[dict]:
  """Per original expert at K: G_max (largest per-sample gradient norm), L (top Hessian
  eigenvalue of its training loss, 20 power iterations) and sigma2, on the first `samples`
  positions of its training subset (`theory.constants`)."""
  S = min(samples, originals.subset.shape[1])
  t = originals.task[:, None]
  rows_S = originals.subset[:, :S]
  x, y = ctx.arrays.x_pool[t, rows_S], ctx.arrays.y_pool[t, rows_S]
  mask = (np.arange(S)[None] < originals.n[:, None]).astype(np.float32)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), K), originals.size)
  G, L, s2 = (np.asarray(v) for v in merging.inputs.per_row(
      _expert_constants, ctx.model, params, x, y, mask, jnp.asarray(originals.num_classes),
      keys))
  return [dict(ctx.common, kind="constants", expert=e, K=K, eta=float(originals.eta[e]),
               b=int(originals.b[e]), n=int(originals.n[e]),
               data_ratio=round(float(originals.data_ratio[e]), 6),
               task=ctx.suite.tasks[originals.task[e]].name, G_max=float(G[e]), L=float(L[e]),
               sigma2=float(s2[e])) for e in range(originals.size)]


def theory_comparison(df) -> dict[str, Any]:
  """Per original expert and K: measured eps^2 (mean over its twins) and gap against the
  non-convex bounds with G and L the largest estimates along its trajectory up to K."""
  ex = df[df.kind == "expert"]
  const = df[df.kind == "constants"].sort_values("K")
  const = const.assign(G=const.groupby("expert").G_max.cummax(),
                       L=const.groupby("expert").L.cummax())
  eps = ex[ex.role == "twin"].groupby(["origin", "K"]).sq_full.mean().rename("eps2")
  orig = ex[ex.role == "original"].set_index(["expert", "K"])[["gap", "train_loss"]]
  table = const.set_index(["expert", "K"])[["eta", "b", "n", "data_ratio", "G", "L"]].join(
      orig).join(eps.rename_axis(["expert", "K"])).reset_index()
  return {target: compare_lib.compare(table, L="L", G="G", target=target, convex=False)
          for target in ("eps2", "gap")}


def merged_gap_comparison(df, cfg) -> compare_lib.Comparison:
  """The merged model's measured gap against the non-convex gap bound of a simple average of M
  experts (eps^2 / M^2), per config and K (means over groups), with the constants
  config.theory.G and .L; eta enters as eta / (1 - momentum) (heuristic for heavy ball,
  docs/theory.md 2.6)."""
  mg = df[df.kind == "merged"]
  ex = df[df.kind == "expert"]
  keys = ["eta", "b", "data_ratio", "K", "M"]
  table = mg.groupby(keys)[["gap", "train_loss"]].mean().reset_index()
  n = ex.groupby(["eta", "b", "data_ratio", "K"]).n.mean().rename("n")
  table = table.join(n, on=["eta", "b", "data_ratio", "K"])
  table["eta"] = table["eta"] / (1.0 - cfg.optim.momentum)
  return compare_lib.compare(table, L=float(cfg.theory.L), G=float(cfg.theory.G), target="gap",
                             convex=False)
