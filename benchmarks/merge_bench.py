"""Merge throughput: jitted `stability.merging` vs per-state_dict loops (numpy; torch as
FusionBench writes them) and vs copy bandwidth.

The question: how fast are our merges on the shape of the paper's protocol (1,000 expert
backbones merged into 1,000 groups of 6)? Backbone: `get_model('mlp', 10)` on 14x14x1 inputs
(41,728 float32 parameters, 167 kB; the stack is 167 MB, larger than the caches).

  .venv/bin/python benchmarks/merge_bench.py [--repeats 5] [--loop-repeats 3] [--levers]

Everything is measured in this one process; times are medians over repeats after one warm-up
(jit compile excluded), with `jax.block_until_ready`. Columns:
  ours / loop   median ms of our jitted merge / of a Python loop over groups and state_dict
                keys with numpy (in-place adds; the way PyTorch toolkits such as FusionBench
                loop over models and parameter names)
  speedup       loop / ours (also against "torch": the same merges written as FusionBench
                writes them, out-of-place state_dict arithmetic on torch tensors; needs the
                `bench` extra)
  GB/s          bytes the merge must move / time: reads G*M + writes G backbones (TIES and
                DARE read and write more; their GB/s uses the same bytes, for scale only)
  % copy        GB/s over the bandwidth of a plain copy of an array the size of the output,
                bytes read + written per second: np.copyto into a preallocated array
                ("copy, no alloc") and a jitted jnp copy that allocates its output like our
                merges do ("copy, alloc")
  loop % copy   the numpy loop's rate over the same bytes, as a % of copy bandwidth: for a
                merge that must move those bytes, ~100 / (loop % copy) bounds the speedup
On a shared 2-core machine the numbers move with the load; rerun when the machine is idle.
Runtime: about 1-2 minutes.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from stability import merging
from stability.merging import sparse
from stability.merging.base import finish, flatten_stack, map_rows
from stability.models import get_model

E, G, M = 1000, 1000, 6
LAM_TA, K_TIES, P_DARE = 0.3, 0.2, 0.5


def _median_time(f, repeats: int) -> float:
  jax.block_until_ready(f())  # warm-up (compiles)
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def _loop_time(f, repeats: int) -> float:
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


# ---------------------------------------------------------------------------------------------
# TIES as it was before the selection and fused merge (issue #21), kept callable for the side by
# side comparison and the bit-exactness tests: exact k-th largest by 32 counting passes of a
# bisection on the float bits, trimmed task vectors materialised, [M, ...] slabs per group.

def _kth_largest_bisect(a, n):
  b = jax.lax.bitcast_convert_type(a, jnp.int32)

  def halve(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo + 1) // 2
    ok = jnp.sum(b >= mid) >= n
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(0x7F800000)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _trim_bisect(tau_leaves, k):
  flat = jnp.concatenate([jnp.abs(t).reshape(-1) for t in tau_leaves])
  n = sparse.n_keep(k, flat.shape[0])
  if n >= flat.shape[0]:
    return list(tau_leaves)
  thr = _kth_largest_bisect(flat, n)
  return [jnp.where(jnp.abs(t) >= thr, t, 0.0) for t in tau_leaves]


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _ties_counting(x0, stack, uniq_U, inv_GxM, lam, k, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  trim_one = lambda u: _trim_bisect([s[u].astype(jnp.float32) - a0.astype(jnp.float32)
                                     for a0, s in zip(leaves0, leaves_s)], k)
  trimmed = map_rows(trim_one, (uniq_U,), min(16, chunk_size or 16))
  return map_rows(lambda idx_M: finish(leaves0, leaves_s, treedef, sparse.ties_merge(
      [t[idx_M] for t in trimmed]), lam), (inv_GxM,), chunk_size)


def ties_counting(x0, stack, groups, *, k=0.2, lam=1.0, chunk_size=merging.CHUNK):
  """The previous `merging.ties` (same contract, same results bit for bit)."""
  uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
  return _ties_counting(x0, stack, jnp.asarray(uniq, jnp.int32),
                        jnp.asarray(inv.reshape(np.shape(groups)), jnp.int32),
                        jnp.float32(lam), k, chunk_size)


# ---------------------------------------------------------------------------------------------
# The per-state_dict numpy loops.

def loop_average(sds, groups):
  out = []
  for row in groups:
    acc = {k: v.copy() for k, v in sds[row[0]].items()}
    for i in row[1:]:
      for k, v in sds[i].items():
        acc[k] += v
    for k in acc:
      acc[k] *= 1.0 / len(row)
    out.append(acc)
  return out


def loop_task_arithmetic(sd0, sds, groups, lam):
  out = []
  for row in groups:
    tv = {k: np.zeros_like(v) for k, v in sd0.items()}
    for i in row:
      for k, v in sds[i].items():
        tv[k] += v - sd0[k]
    out.append({k: sd0[k] + lam * tv[k] for k in sd0})
  return out


def _flatten(sd):
  return np.concatenate([sd[k].reshape(-1) for k in sd])


def _unflatten(vec, like):
  out, i = {}, 0
  for k, v in like.items():
    out[k] = vec[i:i + v.size].reshape(v.shape)
    i += v.size
  return out


def loop_ties(sd0, sds, groups, k, lam):
  """TIES as in the reference code: flatten, top-k by kthvalue, elect, disjoint mean."""
  flat0 = _flatten(sd0)
  D = flat0.size
  n_keep = int(np.ceil(round(k * D, 6)))
  out = []
  for row in groups:
    tvs = np.stack([_flatten(sds[i]) - flat0 for i in row])
    mag = np.abs(tvs)
    thr = -np.partition(-mag, n_keep - 1, axis=1)[:, n_keep - 1:n_keep]
    trimmed = np.where(mag >= thr, tvs, 0.0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = np.where(agree, trimmed, 0.0).sum(0) / np.maximum(agree.sum(0), 1)
    out.append(_unflatten(flat0 + lam * merged, sd0))
  return out


def loop_dare(sd0, sds, groups, p, lam, rng):
  out = []
  for row in groups:
    tv = {k: np.zeros_like(v) for k, v in sd0.items()}
    for i in row:
      for k, v in sds[i].items():
        t = v - sd0[k]
        tv[k] += np.where(rng.random(t.shape, np.float32) >= p, t / (1.0 - p), 0.0)
    out.append({k: sd0[k] + lam * tv[k] for k in sd0})
  return out


# ---------------------------------------------------------------------------------------------
# The same merges the way PyTorch toolkits write them: out-of-place state_dict arithmetic on
# torch tensors (FusionBench's `state_dict_sub/add/mul/avg`: every operation builds a new dict
# of new tensors), TIES on the flattened task vectors (kthvalue, sign election, disjoint mean),
# DARE with torch.bernoulli masks per key. Run only when torch (the `bench` extra) is installed.

def _sd_sub(a, b):
  return {k: a[k] - b[k] for k in a}


def _sd_add(a, b):
  return {k: a[k] + b[k] for k in a}


def _sd_mul(a, c):
  return {k: a[k] * c for k in a}


def torch_average(tsds, groups):
  return [{k: sum(tsds[i][k] for i in row) / len(row) for k in tsds[row[0]]} for row in groups]


def torch_task_arithmetic(tsd0, tsds, groups, lam):
  out = []
  for row in groups:
    tv = None
    for i in row:
      t = _sd_sub(tsds[i], tsd0)
      tv = t if tv is None else _sd_add(tv, t)
    out.append(_sd_add(tsd0, _sd_mul(tv, lam)))
  return out


def torch_ties(torch, tsd0, tsds, groups, k, lam):
  keys = list(tsd0)
  flat0 = torch.cat([tsd0[q].reshape(-1) for q in keys])
  n_drop = flat0.numel() - int(np.ceil(round(k * flat0.numel(), 6)))
  out = []
  for row in groups:
    tvs = torch.stack([torch.cat([tsds[i][q].reshape(-1) for q in keys]) for i in row]) - flat0
    thr = tvs.abs().kthvalue(n_drop, dim=1, keepdim=True).values if n_drop else None
    trimmed = tvs if thr is None else tvs * (tvs.abs() > thr)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    vec, i0, sd = flat0 + lam * merged, 0, {}
    for q in keys:
      sd[q] = vec[i0:i0 + tsd0[q].numel()].reshape(tsd0[q].shape)
      i0 += tsd0[q].numel()
    out.append(sd)
  return out


def torch_dare(torch, tsd0, tsds, groups, p, lam):
  out = []
  for row in groups:
    tv = None
    for i in row:
      t = _sd_sub(tsds[i], tsd0)
      t = {q: v * torch.bernoulli(torch.full_like(v, 1.0 - p)) / (1.0 - p) for q, v in t.items()}
      tv = t if tv is None else _sd_add(tv, t)
    out.append(_sd_add(tsd0, _sd_mul(tv, lam)))
  return out


# ---------------------------------------------------------------------------------------------

def _torch_cases(sd0, sds, groups) -> dict:
  """The torch loops as name -> thunk (same names as `cases`), checked against the numpy loops
  on a few groups first; {} without torch."""
  try:
    import torch
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count() or 1)
  tsd0 = {k: torch.from_numpy(v.copy()) for k, v in sd0.items()}
  tsds = [{k: torch.from_numpy(v.copy()) for k, v in sd.items()} for sd in sds]
  few = groups[:3]
  for got, ref in ((torch_average(tsds, few), loop_average(sds, few)),
                   (torch_task_arithmetic(tsd0, tsds, few, LAM_TA),
                    loop_task_arithmetic(sd0, sds, few, LAM_TA)),
                   (torch_ties(torch, tsd0, tsds, few, K_TIES, 1.0),
                    loop_ties(sd0, sds, few, K_TIES, 1.0))):
    for g, r in zip(got, ref):
      for k in r:
        np.testing.assert_allclose(g[k].numpy(), r[k], rtol=1e-4, atol=1e-5)
  torch.manual_seed(0)
  return {"average": lambda: torch_average(tsds, groups),
          "task_arithmetic": lambda: torch_task_arithmetic(tsd0, tsds, groups, LAM_TA),
          "ties (k=0.2)": lambda: torch_ties(torch, tsd0, tsds, groups, K_TIES, 1.0),
          "dare+TA (p=0.5)": lambda: torch_dare(torch, tsd0, tsds, groups, P_DARE, LAM_TA),
          "version": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=5, help="timed repeats of each jitted merge")
  ap.add_argument("--loop-repeats", type=int, default=3, help="timed repeats of each loop")
  ap.add_argument("--levers", action="store_true", help="also time chunk sizes and variants")
  ap.add_argument("--search", action="store_true",
                  help="only the coefficient-search costs against AdaMerging (tiny setup)")
  args = ap.parse_args()
  if args.search:
    search_costs()
    return

  model = get_model("mlp", 10)
  x0 = model.init_backbone(jax.random.key(0), (14, 14, 1))
  rng = np.random.default_rng(0)
  stack = jax.tree.map(lambda a: jnp.asarray(
      (a[None] + 0.01 * rng.standard_normal((E,) + a.shape, np.float32)).astype(np.float32)), x0)
  groups = rng.permuted(np.tile(np.arange(E), (G, 1)), axis=1)[:, :M].astype(np.int32)
  P = sum(a.size for a in jax.tree.leaves(x0))
  bytes_moved = (G * M + G) * P * 4

  names = ["/".join(str(getattr(k, "key", k)) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(x0)[0]]
  sd0 = dict(zip(names, (np.asarray(a) for a in jax.tree.leaves(x0))))
  host = [np.asarray(a) for a in jax.tree.leaves(stack)]
  sds = [dict(zip(names, (a[e] for a in host))) for e in range(E)]

  # TIES's exact selection (select.kth_largest) == the previous 32-pass bisection, bit for bit.
  for a, b in zip(jax.tree.leaves(merging.ties(x0, stack, groups[:64], k=K_TIES)),
                  jax.tree.leaves(ties_counting(x0, stack, groups[:64], k=K_TIES))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Same semantics before timing: ours == the loops on a few groups.
  few = groups[:3]
  for ours, ref in ((merging.average(x0, stack, few), loop_average(sds, few)),
                    (merging.task_arithmetic(x0, stack, few, lam=LAM_TA),
                     loop_task_arithmetic(sd0, sds, few, LAM_TA)),
                    (merging.ties(x0, stack, few, k=K_TIES),
                     loop_ties(sd0, sds, few, K_TIES, 1.0))):
    for a, k in zip(jax.tree.leaves(ours), names):
      np.testing.assert_allclose(np.asarray(a), np.stack([r[k] for r in ref]), rtol=1e-4,
                                 atol=1e-5)

  big = np.ones(G * P, np.float32)
  dst = np.empty_like(big)
  copy_noalloc = 2 * big.nbytes / _loop_time(lambda: np.copyto(dst, big), 2 * args.repeats + 1)
  jbig = jnp.asarray(big)
  jcopy = jax.jit(jnp.copy)
  copy_alloc = 2 * big.nbytes / _median_time(lambda: jcopy(jbig), 2 * args.repeats + 1)
  copy_bw = max(copy_noalloc, copy_alloc)

  key = jax.random.key(1)
  cases = [
      ("average", lambda: merging.average(x0, stack, groups), lambda: loop_average(sds, groups)),
      ("task_arithmetic", lambda: merging.task_arithmetic(x0, stack, groups, lam=LAM_TA),
       lambda: loop_task_arithmetic(sd0, sds, groups, LAM_TA)),
      ("ties (k=0.2)", lambda: merging.ties(x0, stack, groups, k=K_TIES),
       lambda: loop_ties(sd0, sds, groups, K_TIES, 1.0)),
      ("ties old counting", lambda: ties_counting(x0, stack, groups, k=K_TIES),
       lambda: loop_ties(sd0, sds, groups, K_TIES, 1.0)),
      ("dare+TA (p=0.5)", lambda: merging.dare(x0, stack, groups, key=key, p=P_DARE),
       lambda: loop_dare(sd0, sds, groups, P_DARE, LAM_TA, np.random.default_rng(0))),
  ]
  print(f"E={E} experts, G={G} groups of M={M}; backbone {P} float32 ({P * 4 / 1e3:.0f} kB); "
        f"stack {E * P * 4 / 1e6:.0f} MB; devices: {jax.devices()[0].platform} x "
        f"{jax.device_count()}")
  print(f"copy bandwidth (read+write): no alloc {copy_noalloc / 1e9:.1f} GB/s, "
        f"alloc {copy_alloc / 1e9:.1f} GB/s; '% copy' uses the larger")
  torch_cases = _torch_cases(sd0, sds, groups)
  print(f"{'merge':<18}{'ours ms':>9}{'loop ms':>10}{'speedup':>9}{'torch ms':>10}{'speedup':>9}"
        f"{'GB/s':>8}{'% copy':>8}{'loop % copy':>13}")
  for name, ours, loop in cases:
    t_ours = _median_time(ours, args.repeats)
    t_loop = _loop_time(loop, args.loop_repeats)
    if torch_cases and name in torch_cases:
      t_torch = _loop_time(torch_cases[name], args.loop_repeats)
      torch_cols = f"{t_torch * 1e3:10.1f}{t_torch / t_ours:8.1f}x"
    else:
      torch_cols = f"{'-':>10}{'-':>9}"
    bw = bytes_moved / t_ours
    print(f"{name:<18}{t_ours * 1e3:9.1f}{t_loop * 1e3:10.1f}{t_loop / t_ours:8.1f}x{torch_cols}"
          f"{bw / 1e9:8.1f}{100 * bw / copy_bw:7.0f}%{100 * bytes_moved / t_loop / copy_bw:12.0f}%")
  print("loop % copy: the numpy loop's own rate over the same bytes; a merge that must move "
        "those bytes is at most 100 / (loop % copy) times faster than the loop")
  print("loop: numpy, in place; torch: FusionBench-style out-of-place state_dict arithmetic "
        + ("(torch %s, %d threads)" % (torch_cases["version"], torch_cases["threads"])
           if torch_cases else "(not run: install the bench extra)"))

  if args.levers:
    print("\nlevers (average):")
    for cs in (None, 64, 256):
      t = _median_time(lambda: merging.average(x0, stack, groups, chunk_size=cs), args.repeats)
      print(f"  chunk_size={cs!s:<5} {t * 1e3:8.1f} ms {bytes_moved / t / 1e9:6.1f} GB/s")

    @jax.jit
    def gather_tensordot(stack, groups, w):
      # Materialises the [G, M, ...] slab, then contracts M.
      return jax.tree.map(lambda s: jnp.einsum("gm,gm...->g...", w, s[groups]), stack)

    w = jnp.full((G, M), 1.0 / M, jnp.float32)
    t = _median_time(lambda: gather_tensordot(stack, jnp.asarray(groups), w), args.repeats)
    print(f"  gather+tensordot  {t * 1e3:8.1f} ms {bytes_moved / t / 1e9:6.1f} GB/s")


def search_costs() -> None:
  """Coefficient search vs AdaMerging on a tiny setup: 8 experts (pretrained MLP + noise, own
  heads), 4 groups of M = 4, 64 labelled held-out rows per expert. Each search minimises the
  members' mean held-out cross-entropy of x0 + sum_m lam_m tau_m (`search.task_losses`);
  AdaMerging (task-wise, 200 steps) minimises entropy on the same inputs, unlabelled. Columns:
  wall seconds (compile included: each runs once, as a study would) and the held-out objective
  at the chosen lam, mean over groups; lam mean and the merged twin-distance factor sum lam^2 / M
  (the stability term of task arithmetic scales as lam^2)."""
  from stability.merging import search
  Eh, Gh, Mh, N, C = 8, 4, 4, 64, 5
  model = get_model("mlp", C, widths=(32,))
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  xb0 = model.init_backbone(k0, (8, 8, 1))
  rng = np.random.default_rng(0)
  stack = jax.tree.map(lambda a: jnp.asarray(a[None] + 0.2 * rng.standard_normal(
      (Eh,) + a.shape, np.float32)), xb0)
  heads = jax.vmap(lambda k: model.init_head(k, xb0, (8, 8, 1)))(jax.random.split(k1, Eh))
  xs = rng.uniform(0, 1, (Eh, N, 8, 8, 1)).astype(np.float32)
  # Labels from each expert's own model (so the task is learnable by the expert).
  ys = np.stack([np.asarray(jnp.argmax(model.apply({"backbone": jax.tree.map(
      lambda a: a[e], stack), "head": jax.tree.map(lambda a: a[e], heads)}, xs[e]), -1))
      for e in range(Eh)]).astype(np.int32)
  nc = np.full(Eh, C, np.int32)
  groups = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6], [1, 3, 5, 7]], np.int32)
  f = search.task_losses(xb0, stack, groups, model=model, heads=heads, x=xs, y=ys,
                         num_classes=nc)
  rows = []

  def run(name, thunk):
    t = time.perf_counter()
    lam = np.asarray(jax.block_until_ready(thunk()))
    dt = time.perf_counter() - t
    obj = float(np.mean(np.asarray(f(jnp.asarray(lam)))))
    rows.append((name, dt, obj, float(lam.mean()), float(np.mean(np.sum(lam**2, 1) / Mh))))

  grid1 = jnp.linspace(0, 1, 21)[:, None] * jnp.ones((1, Mh))
  run("task arithmetic 0.3", lambda: jnp.full((Gh, Mh), 0.3))
  run("grid (shared lam, 21)", lambda: search.grid_search(f, grid1, Gh)[0])
  run("random (256 draws)", lambda: search.random_search(f, k2, 256, (Mh,), Gh)[0])
  run("OpenAI-ES (50 x 8)", lambda: search.es_search(f, k2, jnp.full((Gh, Mh), 0.3),
                                                     steps=50, hi=1.0)[0])
  run("MAP (64 samples, w=1/T)", lambda: search.map_pareto(
      f, k2, 64, Mh, Gh, np.full((1, Mh), 1.0 / Mh))[0][0])
  run("AdaMerging task (200)", lambda: merging.adamerging_coefficients(
      xb0, stack, groups, model=model, heads=heads, x=xs, num_classes=nc, key=k2, steps=200,
      lr=1e-2))
  print(f"{'search':<26}{'wall s':>8}{'held-out CE':>13}{'mean lam':>10}{'sum lam^2/M':>13}")
  for name, dt, obj, lm, l2 in rows:
    print(f"{name:<26}{dt:8.2f}{obj:13.4f}{lm:10.3f}{l2:13.3f}")


if __name__ == "__main__":
  main()
