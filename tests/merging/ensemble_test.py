"""stability.merging.ensemble: the logit ensemble == weighted member logits per task."""
import jax
import numpy as np

from stability import merging
from tests.merging.helpers import ref_member_logits, setup


def test_ensemble_averages_member_logits():
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups = np.array([[0, 1, 2], [4, 3, 1]], np.int32)
  w = np.array([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
  got = np.asarray(merging.ensemble(x0, stack, groups, w, model=model, heads=heads, x=x,
                                    num_classes=nc))
  assert got.shape == (2, 3, x.shape[1], 3)
  for g, rows in enumerate(groups):
    wg = w[g] / w[g].sum()
    per_backbone = [ref_member_logits(model, jax.tree.map(lambda a: a[j], stack), heads, rows,
                                      [x[i] for i in rows], nc) for j in rows]
    for t, i in enumerate(rows):
      want = sum(wg[j] * np.asarray(per_backbone[j][t], np.float64) for j in range(3))
      np.testing.assert_allclose(got[g, t, :, :nc[i]], want[:, :nc[i]], rtol=1e-5, atol=1e-5)
      assert np.all(got[g, t, :, nc[i]:] < -1e8)
