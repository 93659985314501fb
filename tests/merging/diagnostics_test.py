"""stability.merging.diagnostics == numpy references (norms, cosines, sign conflicts, TIES
sparsity), the same with chunking."""
import jax
import numpy as np

from stability import merging
from tests.merging.helpers import GROUPS, flat_taus, ref_ties_update, ref_trim, trees


def test_diagnostics_match_reference():
  x0, stack = trees()
  d = merging.diagnostics(x0, stack, GROUPS, k=0.3, key=jax.random.key(1))
  d_chunked = merging.diagnostics(x0, stack, GROUPS, k=0.3, key=jax.random.key(1), chunk_size=3)
  for name in d:
    np.testing.assert_allclose(d_chunked[name], d[name], rtol=1e-6, atol=1e-7, err_msg=name)
  for g, row in enumerate(GROUPS):
    taus = flat_taus(x0, stack, row)
    norms = np.linalg.norm(taus, axis=1)
    np.testing.assert_allclose(d["tau_norm"][g], norms, rtol=1e-5)
    np.testing.assert_allclose(d["cosine"][g], taus @ taus.T / np.outer(norms, norms),
                               rtol=1e-5, atol=1e-6)
    conflict = lambda t: np.mean(np.any(t > 0, 0) & np.any(t < 0, 0))
    trimmed = np.stack([ref_trim(t, 0.3) for t in taus])
    np.testing.assert_allclose(d["sign_conflict"][g], conflict(taus), atol=1e-6)
    np.testing.assert_allclose(d["ties_sign_conflict"][g], conflict(trimmed), atol=1e-6)
    np.testing.assert_allclose(d["ties_sparsity"][g], (trimmed == 0).mean(1), atol=1e-6)
    np.testing.assert_allclose(d["ties_merged_sparsity"][g],
                               np.mean(ref_ties_update(trimmed) == 0), atol=1e-6)
