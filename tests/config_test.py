"""Config loading and dotted overrides: typed, locked, errors name the key."""
import pytest

from stability import config


def test_overrides_parse_to_field_types():
  c = config.load("experiments/main.py", ["--config.sweep.lr=0.1,0.01", "--config.seed=3",
                                          "--config.output.figures=false",
                                          "--config.data.tasks=mnist,digits"])
  assert c.sweep.lr == (0.1, 0.01) and c.seed == 3 and c.output.figures is False
  assert c.data.tasks == ("mnist", "digits")


@pytest.mark.parametrize("arg,msg", [
    ("--config.sweep.lrr=0.1", "config.sweep.lrr: unknown config key"),
    ("--config.nope=1", "config.nope: unknown config key"),
    ("--config.seed=abc", "config.seed: cannot parse"),
    ("--sweep.lr=1", "overrides look like")])
def test_bad_overrides_are_one_line_errors(arg, msg):
  with pytest.raises(ValueError, match=msg):
    config.load("experiments/main.py", [arg])


def test_hash_depends_on_values():
  a = config.load("experiments/main.py")
  b = config.load("experiments/main.py", ["--config.seed=1"])
  assert config.config_hash(a) != config.config_hash(b)
  assert config.config_hash(a) == config.config_hash(config.load("experiments/main.py"))
