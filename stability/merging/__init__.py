"""Merging expert backbones into one backbone per group.

Legend:
  E       experts: rows of `stack`, a backbone pytree whose leaves have a leading axis E
  x0      pretrained backbone (same tree, no E axis); x_i the backbone of expert i
  tau_i   task vector x_i - x0
  G, M    groups and members per group; `groups` [G, M] int indexes rows of the stack
  w       member weights [G, M] (`weights`)
  L       leaves of the backbone pytree (one "layer" for layer-wise methods)
  lam     task-vector scale; k TIES keep fraction; p DARE drop rate; t interpolation factor
  N       samples per expert for data-dependent merges; C logits (max_classes)

Every merge acts on BACKBONES only and returns a backbone stack with leaves [G, ...]; heads are
never merged (the caller pairs merged backbone g with each member's own head).

Every merge is pure, jitted, `jax.vmap`-ed over groups and mapped over chunks of `chunk_size`
groups (`jax.lax.map(..., batch_size=chunk_size)`; None = all groups in one vmap), so memory is
O(chunk_size * M * |backbone|) however many groups there are (default `CHUNK` = 64, or None for
the linear merges and DARE on a linear base, which materialise nothing beyond their output).
Inputs are validated on the host before any compute; a bad input raises a one-line ValueError
naming the field.

API (every merge: `f(x0, stack, groups, ..., chunk_size=, tasks=)` -> backbone stack [G, ...]),
by module:
  linear        average, weighted_average, uniform_soup, task_arithmetic
  sparse        ties (exact top-k by `select.kth_largest`), dare (base = average |
                task_arithmetic | ties)
  data_aware    fisher (+ diag_fisher), regmean (+ gram_matrices, solve),    statistics-weighted
                regmean_plusplus (Grams under the merged model; needs model and samples)
  learned       adamerging (+ adamerging_coefficients), greedy_soup        need a `Model`
  geometric     slerp (M = 2), model_stock
  linear (+)    metrics_weighted (softmax of -training loss; needs losses [E])
  spectral      tsv_m (task singular vectors), iso_c, iso_cts (isotropic)       per 2-D layer
  magnitude     breadcrumbs (trim both tails per layer), magmax (max |tau| per parameter),
                della (magnitude-ranked drops + TIES fuse), emr (per-member backbones
                [G, M, ...])
  trajectory    snapshot_average (tail), snapshot_ema: ONE expert's K snapshots [K, ...]
  select        kth_largest: exact k-th largest without sorting (TIES's threshold)
  search        coefficient search (grid, random, ES, MAP quadratic Pareto front)
  ensemble      ensemble: the non-merged reference, logits [G, M, N, C], not parameters
  diagnostics   diagnostics: task-vector norms, cosines, sign conflicts, TIES/DARE sparsity
  batch_stats   merge_batch_stats: BatchNorm statistics of merged backbones (BATCH_STATS_MODES:
                average | frozen | recompute)
  registry      ALGORITHMS (name -> `Algorithm`: fn and flags), algorithm(name), get(name),
                merge(name, x0, stack, groups, **hparams), names(**filters), stack_only(),
                data_merges(), compare_names() (+ ENSEMBLE, the non-merged reference)
  base          the shared validation and mapping helpers, CHUNK
  inputs        MergeData, merge_fns, ensemble_metrics: the studies' inputs of each merge
                (loaded on first access to `merging.inputs`: it imports `stability.twins`,
                which imports this package)
Every name above except the modules is re-exported here, so `merging.average(...)` works;
`merging.ensemble` and `merging.diagnostics` are the functions (their modules are
`stability.merging.ensemble` / `.diagnostics` in `from ... import`).
`groups` must be concrete (it is validated on the host); `tasks` [E] (optional) gives each
expert's task, and a group holding one task twice is an error. Data for data-dependent merges
is per expert: x [E, N, H, W, C], y [E, N], mask [E, N] (1 = real row), num_classes [E], heads
[E, ...] (each expert's own head).

Throughput: outputs are fresh buffers; on Linux with THP in `madvise` mode, XLA's large CPU
allocations fault in 4 kB pages, which can cost more than the merge itself (167 MB: ~100 ms).
Start the process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to get huge pages
(benchmarks/merge_bench.py).

RNG (DARE, AdaMerging): group g's randomness is keyed by fold_in(key, id_g), where id_g =
group_ids[g] (default: g, the group's row). DARE's keep masks are Bernoulli(1 - p) per entry of
[M, D] (D the backbone flattened in tree order, row m = member m) from a counter-based hash of
per-member jax.random seeds (`sparse.dare_masks`). So results do not depend on chunk_size, and
a stability twin group given its original group's id gets the same masks (and AdaMerging the
same minibatches).
"""
from stability.merging.base import CHUNK
from stability.merging.batch_stats import BATCH_STATS_MODES, merge_batch_stats
from stability.merging.data_aware import (diag_fisher, fisher, gram_matrices, regmean,
                                          regmean_plusplus, solve)
from stability.merging.diagnostics import diagnostics
from stability.merging.ensemble import ensemble
from stability.merging.geometric import model_stock, slerp
from stability.merging.learned import adamerging, adamerging_coefficients, greedy_soup
from stability.merging.linear import (average, metrics_weighted, task_arithmetic, uniform_soup,
                                      weighted_average)
from stability.merging.magnitude import breadcrumbs, della, emr, magmax
from stability.merging.registry import (ALGORITHMS, ENSEMBLE, Algorithm, algorithm,
                                        compare_names, data_merges, get, merge, names,
                                        stack_only)
from stability.merging.sparse import dare, ties
from stability.merging.spectral import iso_c, iso_cts, tsv_m
from stability.merging.trajectory import snapshot_average, snapshot_ema



def __getattr__(name: str):
  # `inputs` imports stability.twins, which imports this package: load it on first use only.
  if name == "inputs":
    import importlib
    return importlib.import_module("stability.merging.inputs")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALGORITHMS", "Algorithm", "BATCH_STATS_MODES", "CHUNK", "ENSEMBLE", "adamerging",
    "adamerging_coefficients", "algorithm", "average", "breadcrumbs", "compare_names", "dare",
    "data_merges", "della", "diag_fisher", "diagnostics", "emr", "ensemble", "fisher", "get",
    "gram_matrices", "greedy_soup", "iso_c", "iso_cts", "magmax", "merge", "merge_batch_stats",
    "metrics_weighted", "model_stock", "names", "regmean", "regmean_plusplus", "slerp",
    "snapshot_average", "snapshot_ema", "solve", "stack_only", "task_arithmetic", "ties", "tsv_m",
    "uniform_soup", "weighted_average",
]
