"""docs/config.md is generated from the base config and the registries, so it cannot drift."""
import importlib.util
import os

import pytest

from deepflow.config import ConfigDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gen():
  spec = importlib.util.spec_from_file_location(
      "gen_config_docs", os.path.join(ROOT, "tools", "gen_config_docs.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_reference_is_current(gen):
  with open(gen.OUTPUT) as f:
    committed = f.read()
  assert committed == gen.render(), ("docs/config.md is stale: run "
                                     "`python tools/gen_config_docs.py` and commit the result")


def test_every_key_is_documented(gen):
  assert not [k for k, meaning in gen.meanings().items() if not meaning], (
      "base-config keys without a meaning: add an inline comment in base_config")


def written_like_base_config():
  c = ConfigDict()
  c.seed = 0
  c.data = ConfigDict({
      "batch_size": 128,      # global batch
      "source": "x",          # a long comment
                              # that goes on
      "cache": True,
  })
  c.mesh = ConfigDict({"shape": ConfigDict({"data": -1})})  # rightmost key on the line
  c.privacy = ConfigDict({    # a section's own comment
      "enabled": False,
  })
  return c


def test_comments_are_parsed(gen):
  assert gen.key_comments(written_like_base_config) == {
      "data.batch_size": "global batch", "data.source": "a long comment that goes on",
      "mesh.shape.data": "rightmost key on the line", "privacy": "a section's own comment"}
