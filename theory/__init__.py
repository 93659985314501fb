"""Analytic side of the study: stability bounds, constant estimators, fits, theory-vs-measurement.

Modules: `bounds` (pure formulas), `constants` (L, G, sigma2, zeta2 from a model and data),
`fit` (log-log OLS, bootstrap, Spearman), `compare` (join bounds with a results table; CLI).
Statements, assumptions, sources and the tests that check them: docs/theory.md.

Legend
  eta     constant SGD step size (learning rate)
  b       minibatch size; p = b/n is the chance that a given sample is in a given step's batch
  K       number of SGD steps (updates), counted from the shared start x0
  n       training-set size of one expert (task)
  s       steps per epoch, n // b (the sampler reshuffles every epoch, drop_last)
  M       number of merged experts (tasks)
  L       smoothness: |eigenvalues of the per-sample Hessian| <= L
  G       Lipschitz constant: per-sample gradient norm <= G
  sigma2  per-sample gradient variance, mean_i ||g_i - mean g||^2
  zeta2   task heterogeneity, sum_m w_m ||g_m - sum_m' w_m' g_m'||^2 over task mean gradients g_m
  eps2    l2 on-average model stability, E[(1/n) sum_j ||A(S^(j)) - A(S)||^2]
"""
