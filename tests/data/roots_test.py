"""A data root: where datasets are looked for, missing-data reports, discovery."""
import os

import numpy as np
import pytest

from stability import data
from stability.data import roots


def test_find_missing_and_describe_missing_say_where_they_looked(tmp_path, write_folder,
                                                                 class_images):
  write_folder(tmp_path / "mnist", {"train": class_images(0, ["0", "1"], 2)})
  np.savez(tmp_path / "svhn.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=[0, 1])
  root = str(tmp_path)
  missing = dict(roots.find_missing(root))
  assert len(missing) == 18 and "mnist" not in missing and "svhn" not in missing
  assert missing["dtd"] == (os.path.join(root, "dtd", "train", "<class>", ""),
                            os.path.join(root, "dtd.npz"),
                            os.path.join(root, "dtd", "x_train.npy"),
                            os.path.join(root, "hf", "dtd", "") + "{*.parquet,*.arrow,"
                            "dataset_dict.json}",
                            os.path.join(root, "tfds", "dtd", ""))
  assert all("tfds" not in p for p in missing["gtsrb"])  # not in the TFDS catalog
  report = roots.describe_missing(root)
  lines = report.splitlines()
  assert lines[0] == f"18 of 20 datasets missing under {root}:"
  assert len(lines) == 19 and lines[1].startswith("  missing sun397: looked at ")
  assert roots.describe_missing(root, ["mnist", "svhn"]) == (
      f"all 2 datasets found under {root}")
  with pytest.raises(ValueError, match="data_root: 18 of 20 datasets missing"):
    data.get_suite("paper20", 0, data_root=root)
  assert roots.locate(root, "svhn") == ("npz", os.path.join(root, "svhn.npz"))
  assert roots.discover(root) == ("mnist", "svhn")
