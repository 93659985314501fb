"""Expert training throughput: our Trainer vs PyTorch (per-expert loop, torch.func ensemble) and
vs the machine's large-matmul FLOP rate.

The question: how many expert-steps per second does `stability.train.Trainer` (the code path the
runner uses) reach against the ways PyTorch users train many small models, and what fraction of
the machine's matmul FLOP rate is that? Every method trains the same model (MLP 64-128-10 on
sklearn's 8x8 digits, 1,797 samples, 10 classes), from the same initial parameters, with the
same minibatches (batch 32, the library's per-expert epoch shuffles), SGD (momentum 0.9, weight
decay 1e-4, lr 0.01, PyTorch semantics), for the same number of steps:

  ours        `Trainer.run` to K = steps (expert axis sharded over the host devices, minibatch
              positions computed inside the scan, divergence/K masking as in every study)
  plain JAX   the best hand-written reference: jit(vmap(scan)) of a bare step with a
              precomputed index table, sharded the same way (no masking, no sampler)
  torch loop  one nn.Module + torch.optim.SGD per expert, trained one expert after the other
              (timed on `--loop-experts` experts: its rate per expert-step does not depend on E)
  torch.func  stack_module_state + vmap(grad(functional_call)) over all E experts, SGD with
              momentum on the stacked tensors

  .venv/bin/python benchmarks/train_bench.py [--sizes 16,256,1024,4096] [--steps 200]
      [--repeats 3] [--big-repeats 1] [--levers]

Prints one row per E: expert-steps/s of each method (medians over the repeats, interleaved;
compilation and PyTorch warm-up excluded), the ratios ours/loop (goal >= 20), ours/func (goal
>= 2) and ours/plain, and ours as a fraction of the large-matmul FLOP rate measured in the same
run (the best of 10 2048^2 matmuls in JAX or PyTorch; goal >= 50%). PyTorch runs at 1 thread or
one per core, whichever a short trial finds faster (under load, several threads stall). The
start and end load averages are printed: above ~0.5 another process shared the cores, and the
ratios against the single-threaded loop then favour the loop. FLOPs per expert-step are the
matmuls of forward and backward: 2b(64*128 + 128*10) forward, the same for the weight
gradients, 2b*128*10 for the hidden gradient (1.29 MFLOP at b = 32). Sizes >= 4096 use
`--big-repeats`. `--levers` also times the trainer at other block sizes and chunk lengths.
Runtime: about 6 minutes on an idle 2-core CPU, 9 under load (PyTorch from the `bench` extra:
`.venv/bin/pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import os
import time

from stability import sharding as sharding_lib  # noqa: E402  (sets host devices before jax)

sharding_lib.use_host_cores()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stability import experts as experts_lib  # noqa: E402
from stability import data, models, train  # noqa: E402

D_IN, HIDDEN, CLASSES, B = 64, 128, 10, 32
ETA, MOMENTUM, WD = 0.01, 0.9, 1e-4


def flops_per_step(b: int = B) -> int:
  """Matmul FLOPs of one expert-step: forward, weight gradients, hidden-layer gradient."""
  fwd = 2 * b * (D_IN * HIDDEN + HIDDEN * CLASSES)
  return 2 * fwd + 2 * b * HIDDEN * CLASSES


def digits_suite() -> data.Suite:
  """sklearn's 8x8 digits as one 10-class task (every sample in the train pool)."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  empty_x, empty_y = x[:0], y[:0]
  task = data.Task(name="digits", num_classes=10, x_train=x, y_train=y, x_test=empty_x,
                   y_test=empty_y, x_ghost=empty_x, y_ghost=empty_y)
  return data.Suite(name="digits8x8", seed=0, tasks=(task,), x_pretrain=empty_x,
                    y_pretrain=empty_y, pretrain_classes=10)


class Setup:
  """E experts (seeds 0..E-1) on the digits task, their initial params and minibatch rows."""

  def __init__(self, suite: data.Suite, E: int, steps: int):
    self.suite, self.E, self.steps = suite, E, steps
    self.model = models.get_model("mlp", CLASSES, widths=(HIDDEN,))
    self.spec = experts_lib.make_experts(suite, task=[0] * E, eta=ETA, b=B, K=steps,
                                         data_ratio=1.0, seed=np.arange(E), momentum=MOMENTUM,
                                         weight_decay=WD)
    self.pools = train.Pools.from_arrays(suite.arrays())
    backbone0 = self.model.init_backbone(jax.random.key(0), suite.image_shape)
    self.params = experts_lib.init_stack(self.model, backbone0, self.spec, suite.image_shape)
    self.X = np.asarray(suite.tasks[0].x_train).reshape(-1, D_IN)
    self.Y = np.asarray(suite.tasks[0].y_train)

  def rows(self, E: int | None = None) -> np.ndarray:
    """[E, steps, B] rows of the pool read by each expert at each step (the library's sampler)."""
    spec = self.spec.take(np.arange(E or self.E))
    n_ep = train.chunk_epochs(spec, self.steps)
    pos = jax.jit(jax.vmap(lambda s, n, b: train.chunk_positions(
        s, 0, n, b, C=self.steps, B=B, N=spec.subset.shape[1], n_epochs=n_ep)[0]))(
            spec.seed, spec.n, spec.b)
    return np.take_along_axis(spec.subset[:, None, :], np.asarray(pos).reshape(
        spec.size, 1, -1), axis=2).reshape(spec.size, self.steps, B)

  def dense(self, E: int | None = None) -> dict[str, np.ndarray]:
    """Initial params as w1 [E, 64, 128], b1, w2 [E, 128, 10], b2 (x @ w + b)."""
    return ours_as_dense(jax.tree.map(lambda a: a[:E or self.E], self.params))


# ---------------------------------------------------------------------------------------------
# Ours and the plain JAX reference.

def ours(setup: Setup, **trainer_kw):
  """run(steps) trains all experts with the library's Trainer and returns their params;
  run.warm_up() compiles (one chunk)."""
  trainer = train.Trainer(setup.model, "sgd", setup.spec, setup.pools, **trainer_kw)

  def run(steps: int = setup.steps):
    state = trainer.init(setup.params)
    for _, state in trainer.run(state, [steps]):
      pass
    return trainer.unpad(jax.block_until_ready(state).params)
  run.warm_up = lambda: run(trainer.chunk([setup.steps]))
  return run


def _plain_loss(p, x, y):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  logp = jax.nn.log_softmax(h @ p["w2"] + p["b2"])
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def plain_jax(setup: Setup):
  """jit(vmap(scan)) of a bare SGD step over a precomputed index table, sharded over devices."""
  mesh = sharding_lib.expert_mesh()
  shard = sharding_lib.expert_sharding(mesh)
  X, Y = jnp.asarray(setup.X), jnp.asarray(setup.Y)
  rows = jax.device_put(sharding_lib.pad_tree(setup.rows(), mesh.size), shard)
  p0 = sharding_lib.pad_tree(setup.dense(), mesh.size)

  def one_expert(p, rows_CxB):
    def body(carry, r):
      p, m = carry
      g = jax.grad(_plain_loss)(p, X[r], Y[r])
      m = jax.tree.map(lambda m, g, p: MOMENTUM * m + g + WD * p, m, g, p)
      return (jax.tree.map(lambda p, m: p - ETA * m, p, m), m), None
    (p, _), _ = jax.lax.scan(body, (p, jax.tree.map(jnp.zeros_like, p)), rows_CxB)
    return p

  fn = jax.jit(jax.vmap(one_expert), donate_argnums=(0,), out_shardings=shard)
  compiled = []

  def run():
    p = jax.device_put(p0, shard)
    if not compiled:
      compiled.append(fn.lower(p, rows).compile())
    return jax.tree.map(lambda a: a[:setup.E], jax.block_until_ready(compiled[0](p, rows)))
  run.warm_up = lambda: compiled or compiled.append(fn.lower(jax.device_put(p0, shard),
                                                             rows).compile())
  return run


# ---------------------------------------------------------------------------------------------
# PyTorch.

def _torch_mlp(torch, p: dict[str, np.ndarray], e: int):
  net = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(),
                            torch.nn.Linear(HIDDEN, CLASSES))
  with torch.no_grad():
    net[0].weight.copy_(torch.from_numpy(p["w1"][e].T.copy()))
    net[0].bias.copy_(torch.from_numpy(p["b1"][e].copy()))
    net[2].weight.copy_(torch.from_numpy(p["w2"][e].T.copy()))
    net[2].bias.copy_(torch.from_numpy(p["b2"][e].copy()))
  return net


def torch_loop(setup: Setup, E: int):
  """One model and optimizer per expert, trained one after the other (the first E experts)."""
  import torch
  import torch.nn.functional as F
  X, Y = torch.from_numpy(setup.X), torch.from_numpy(setup.Y.astype(np.int64))
  rows, p0 = torch.from_numpy(setup.rows(E).astype(np.int64)), setup.dense(E)

  def run():
    out = []
    for e in range(E):
      net = _torch_mlp(torch, p0, e)
      opt = torch.optim.SGD(net.parameters(), lr=ETA, momentum=MOMENTUM, weight_decay=WD)
      for k in range(setup.steps):
        r = rows[e, k]
        loss = F.cross_entropy(net(X[r]), Y[r])
        opt.zero_grad()
        loss.backward()
        opt.step()
      out.append(net)
    return out
  return run


def torch_func(setup: Setup):
  """stack_module_state + vmap(grad(functional_call)) over all experts; SGD on the stacks."""
  import copy
  import torch
  import torch.nn.functional as F
  from torch.func import functional_call, grad, stack_module_state, vmap
  X, Y = torch.from_numpy(setup.X), torch.from_numpy(setup.Y.astype(np.int64))
  rows, p0 = torch.from_numpy(setup.rows().astype(np.int64)), setup.dense()
  base = copy.deepcopy(_torch_mlp(torch, p0, 0)).to("meta")

  def loss(params, x, y):
    return F.cross_entropy(functional_call(base, params, (x,)), y)

  vgrad = vmap(grad(loss))

  def run(steps: int = setup.steps):
    params, _ = stack_module_state([_torch_mlp(torch, p0, e) for e in range(setup.E)])
    params = {k: v.detach() for k, v in params.items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    for k in range(steps):
      r = rows[:, k]
      g = vgrad(params, X[r], Y[r])
      with torch.no_grad():
        for name, p in params.items():
          gk = g[name].add_(p, alpha=WD)
          bufs[name].mul_(MOMENTUM).add_(gk)
          p.sub_(bufs[name], alpha=ETA)
    return params
  run.warm_up = lambda: run(3)
  return run


def with_best_threads(run, trial):
  """`run` pinned to the faster torch thread count (1 or all cores) on `trial()`: with several
  threads, PyTorch's small ops stall whenever another process takes a core (measured 100x)."""
  import torch
  cores = os.cpu_count() or 1
  best = {}
  for threads in sorted({1, cores}):
    torch.set_num_threads(threads)
    trial()  # warm-up
    t = time.perf_counter()
    trial()
    best[threads] = time.perf_counter() - t
  threads = min(best, key=best.get)

  def pinned(*a, **kw):
    torch.set_num_threads(threads)
    return run(*a, **kw)
  pinned.threads = threads
  pinned.warm_up = lambda: None
  return pinned


def torch_params_as_dense(params) -> dict[str, np.ndarray]:
  return {"w1": params["0.weight"].numpy().transpose(0, 2, 1), "b1": params["0.bias"].numpy(),
          "w2": params["2.weight"].numpy().transpose(0, 2, 1), "b2": params["2.bias"].numpy()}


def ours_as_dense(params) -> dict[str, np.ndarray]:
  p = jax.tree.map(np.asarray, params)
  return {"w1": p["backbone"]["Dense_0"]["kernel"], "b1": p["backbone"]["Dense_0"]["bias"],
          "w2": p["head"]["Dense_0"]["kernel"], "b2": p["head"]["Dense_0"]["bias"]}


def max_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


# ---------------------------------------------------------------------------------------------
# Timing.

def matmul_rates(n: int = 2048, repeats: int = 10) -> dict[str, float]:
  """Best FLOP/s over `repeats` n x n float32 matmuls: JAX on one device, JAX on every device
  (one matmul each), PyTorch. Best, not median: the machine's capability, robust to load."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  out = {}
  one = jax.jit(lambda x: x @ x)
  a1 = jax.device_put(a)
  out["jax, 1 device"] = 2 * n ** 3 / _best(lambda: jax.block_until_ready(one(a1)), repeats)
  mesh = sharding_lib.expert_mesh()
  if mesh.size > 1:
    s = sharding_lib.expert_sharding(mesh)
    stack = jax.device_put(np.broadcast_to(a, (mesh.size, n, n)).copy(), s)
    many = jax.jit(lambda x: x @ x, out_shardings=s)
    out[f"jax, {mesh.size} devices"] = mesh.size * 2 * n ** 3 / _best(
        lambda: jax.block_until_ready(many(stack)), repeats)
  try:
    import torch
    t = torch.from_numpy(a)
    out[f"torch ({torch.get_num_threads()} threads)"] = 2 * n ** 3 / _best(lambda: t @ t,
                                                                           repeats)
  except ImportError:
    pass
  return out


def _best(f, repeats: int) -> float:
  f()  # warm-up
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t)
  return float(np.min(ts))


def time_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Wall seconds of each callable, `repeats` rounds, the methods interleaved in each round."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  return times


def check_same_training(suite: data.Suite, with_torch: bool, steps: int = 20,
                        E: int = 4) -> dict[str, float]:
  """Max |param difference| after `steps` steps between ours and each other method."""
  s = Setup(suite, E, steps)
  ref = ours_as_dense(ours(s, max_chunk=steps)())
  out = {"plain JAX": max_diff(ref, plain_jax(s)())}
  if with_torch:
    out["torch loop"] = max_diff(ref, {k: np.stack([_loop_param(n, k) for n in
                                                    torch_loop(s, E)()]) for k in ref})
    out["torch.func"] = max_diff(ref, torch_params_as_dense(torch_func(s)()))
  return out


def _loop_param(net, key: str) -> np.ndarray:
  layer = net[0] if key.endswith("1") else net[2]
  if key.startswith("w"):
    return layer.weight.detach().numpy().T
  return layer.bias.detach().numpy()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="16,256,1024,4096", help="numbers of experts E")
  ap.add_argument("--steps", type=int, default=200, help="SGD steps per expert")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs of each method")
  ap.add_argument("--big-repeats", type=int, default=1, help="timed runs for E >= 4096")
  ap.add_argument("--loop-experts", type=int, default=16,
                  help="experts the sequential PyTorch loop trains (its rate is per expert-step)")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch methods")
  ap.add_argument("--levers", action="store_true",
                  help="also time the trainer's block sizes and chunk lengths at the largest E")
  args = ap.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  suite = digits_suite()
  have_torch = False
  if not args.no_torch:
    try:
      import torch
      have_torch = True
    except ImportError:
      print("PyTorch not installed (.venv/bin/pip install -e '.[bench]'): JAX methods only")

  t_start = time.perf_counter()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); cores: {os.cpu_count()}; "
        f"load average at start: {os.getloadavg()[0]:.1f}")
  if have_torch:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  rates = matmul_rates()
  peak = max(rates.values())
  print("large matmul (2048^2 float32, best of 10): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s"
                                                     for k, v in rates.items()))
  F = flops_per_step()
  print(f"MLP {D_IN}-{HIDDEN}-{CLASSES}, b={B}, {args.steps} steps, {F / 1e6:.2f} MFLOP per "
        f"expert-step; peak = the fastest matmul = {peak / 1e9:.0f} GFLOP/s = "
        f"{peak / F:,.0f} expert-steps/s")
  diffs = check_same_training(suite, have_torch)
  print("same training: max |param - ours| after 20 steps (4 experts): "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))

  loop_rate = float("nan")
  if have_torch:
    s = Setup(suite, args.loop_experts, args.steps)
    loop = with_best_threads(torch_loop(s, args.loop_experts), torch_loop(s, 1))
    loop_t = time_interleaved({"loop": loop}, args.repeats)["loop"]
    loop_rate = args.loop_experts * args.steps / float(np.median(loop_t))
    print(f"torch loop: {args.loop_experts} experts x {args.steps} steps, {loop.threads} "
          f"thread(s), median of {len(loop_t)}: {np.median(loop_t):.2f} s -> "
          f"{loop_rate:,.0f} expert-steps/s")

  print(f"\nexpert-steps/s (medians), ratios of medians:\n{'E':>5} {'runs':>4} {'ours':>8} "
        f"{'plain':>8} {'t.func':>8} {'t.loop':>8} {'ours/loop':>10} {'ours/func':>10} "
        f"{'ours/plain':>10} {'% peak':>7}")
  rows = []
  for E in sizes:
    s = Setup(suite, E, args.steps)
    fns = {"ours": ours(s), "plain": plain_jax(s)}
    if have_torch:
      func = torch_func(s)
      fns["func"] = with_best_threads(func, lambda: func(10))
    for f in fns.values():  # compile, allocate
      f.warm_up()
    reps = args.big_repeats if E >= 4096 else args.repeats
    times = time_interleaved(fns, reps)
    rate = {k: E * args.steps / float(np.median(v)) for k, v in times.items()}
    rate.setdefault("func", float("nan"))
    rows.append((E, rate))
    print(f"{E:5d} {reps:4d} {rate['ours']:8,.0f} {rate['plain']:8,.0f} {rate['func']:8,.0f} "
          f"{loop_rate:8,.0f} {rate['ours'] / loop_rate:9.1f}x {rate['ours'] / rate['func']:9.2f}x "
          f"{rate['ours'] / rate['plain']:9.2f}x {100 * rate['ours'] * F / peak:6.0f}%"
          + (f"   (torch.func: {fns['func'].threads} thread(s))" if have_torch else ""),
          flush=True)
  print(f"goals: ours/loop >= 20x, ours/func >= 2x, >= 50% of peak. Load average at end: "
        f"{os.getloadavg()[0]:.1f} (above ~0.5 the machine was shared: rerun when idle); "
        f"{time.perf_counter() - t_start:.0f} s")

  if args.levers:
    E = max(sizes)
    s = Setup(suite, E, args.steps)
    print(f"\nlevers at E = {E} (ours, expert-steps/s, medians of {args.repeats}; default: "
          f"{train.Trainer(s.model, 'sgd', s.spec, s.pools).blocks} blocks, max_chunk=100):")
    variants = {f"block={b}": dict(block=b) for b in (1, 2, 4, 8, 16, 32, E)}
    variants.update({f"max_chunk={c}": dict(max_chunk=c) for c in (20, 50, 200)})
    fns = {k: ours(s, **kw) for k, kw in variants.items()}
    for f in fns.values():
      f.warm_up()
    times = time_interleaved(fns, args.repeats)
    for k, v in times.items():
      print(f"  {k:14s} {E * args.steps / float(np.median(v)):9,.0f}")


if __name__ == "__main__":
  main()
