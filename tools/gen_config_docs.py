"""Writes docs/config.md, the configuration reference, from the code it describes.

Keys and defaults come from ``deepflow.config.base_config()``; their meanings from the inline
comments in its source; the choices for each ``name`` from the registries (models with their
fields via ``deepflow.models.model_options``, tasks, optimizers, schedules, transforms,
regularizers, datasets, activations) and the first sentence of each one's docstring. Generated,
so it cannot drift: ``tests/test_docs.py`` fails when the committed file differs.

    python tools/gen_config_docs.py          # rewrite docs/config.md
    python tools/gen_config_docs.py --check  # exit 1 if it is stale
"""
from __future__ import annotations

import ast
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
from typing import Any, Iterable

from deepflow import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "config.md")

# ------------------------------------------------------------------------------------------------
# The base config: keys, defaults and the comments beside them.
# ------------------------------------------------------------------------------------------------

def key_comments(function: Any = config_lib.base_config) -> dict[str, str]:
  """'data.batch_size' -> its inline comment in the source of ``base_config`` (or a function
  written like it). A comment belongs to the rightmost key on its line; comment-only lines right
  below continue it."""
  source = textwrap.dedent(inspect.getsource(function))
  lines = source.splitlines()
  comments = {tok.start[0]: tok.string.lstrip("#").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline)
              if tok.type == tokenize.COMMENT}
  keys: dict[int, tuple[int, str]] = {}  # line -> (column, path) of its rightmost key

  def add(line: int, col: int, path: str) -> None:
    if line not in keys or col > keys[line][0]:
      keys[line] = (col, path)

  def visit(node: ast.AST, prefix: str) -> None:
    if isinstance(node, ast.Call) and node.args:  # ConfigDict({...})
      node = node.args[0]
    if isinstance(node, ast.Dict):
      for key, value in zip(node.keys, node.values):
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
          add(key.lineno, key.col_offset, prefix + key.value)
          visit(value, f"{prefix}{key.value}.")

  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Attribute)):
      add(node.lineno, node.col_offset, node.targets[0].attr)
      visit(node.value, node.targets[0].attr + ".")

  out: dict[str, str] = {}
  for line in sorted(comments):
    if line in keys:
      out[keys[line][1]] = comments[line]
    elif lines[line - 1].lstrip().startswith("#"):  # a continuation of the key above it
      above = next((l for l in range(line - 1, 0, -1)
                    if not lines[l - 1].lstrip().startswith("#")), None)
      if above in keys and keys[above][1] in out:
        out[keys[above][1]] += " " + comments[line]
  return out


def leaves(config: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
  """('data.batch_size', 128), ... in definition order; an empty section (a free-form one such
  as train.xla_options) is a leaf."""
  for key, value in config.items():
    if isinstance(value, config_lib.ConfigDict) and value:
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value.to_dict() if isinstance(value, config_lib.ConfigDict) else value


def meanings() -> dict[str, str]:
  """Every base key's meaning: the comment beside it in ``base_config``."""
  comments = key_comments()
  return {key: comments.get(key, "")
          for key, _ in leaves(config_lib.base_config())}


# ------------------------------------------------------------------------------------------------
# Rendering.
# ------------------------------------------------------------------------------------------------

def cell(text: Any) -> str:
  """Text safe inside a Markdown table cell."""
  return str(text).replace("|", "\\|").replace("\n", " ")


def code(value: Any) -> str:
  return cell(f"`{value!r}`" if not isinstance(value, str) or value else "`''`")


def summary(obj: Any) -> str:
  """The first sentence of an object's docstring ('' when it has none)."""
  doc = inspect.getdoc(obj) or ""
  paragraph = " ".join(doc.split("\n\n")[0].split())
  return re.split(r"(?<=\.)\s+(?=[A-Z(`])", paragraph)[0]


def table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return out + [""]


def options_of(factory: Any, skip: tuple[str, ...] = ()) -> str:
  """A factory's keyword options with their defaults, e.g. ``per='auto', keys=('input',)``."""
  parts = []
  for p in inspect.signature(factory).parameters.values():
    if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
  return cell(f"`{', '.join(parts)}`") if parts else ""


def render() -> str:
  """The whole of docs/config.md."""
  from deepflow import data, optim, regularizers, tasks  # noqa: F401  (fill the registries)
  from deepflow.data.bundled import BUILDERS
  from deepflow.models import model_options  # fills MODELS
  from deepflow.registry import (ACTIVATIONS, DATASETS, MODELS, OPTIMIZERS, REGULARIZERS,
                                 SCHEDULES, TASKS, TRANSFORMS)

  out = [
      "# Configuration reference",
      "",
      "<!-- Generated by `python tools/gen_config_docs.py` from `deepflow.config.base_config()` "
      "and the registries. Do not edit: tests/test_docs.py fails when this file is stale. -->",
      "",
      "An experiment file's `get_config()` starts from `deepflow.config.base_config()` and sets "
      "the keys below; any of them can also be set on the command line, e.g. "
      "`--config.train.steps=200` or `--config.model.hidden='(64, 64)'`. An unknown key or a "
      "value of the wrong type is an error that names the key.",
      "",
      "## Base config",
      "",
  ]
  described, comments = meanings(), key_comments()
  sections: dict[str, list[tuple[str, Any]]] = {"top level": []}
  for key, value in leaves(config_lib.base_config()):
    section = key.split(".")[0] if "." in key else "top level"
    sections.setdefault(section, []).append((key, value))
  for section, items in sections.items():
    out += [f"### {section if section == 'top level' else f'`{section}`'}", ""]
    if section in comments:  # a comment on the section's own line
      out += [cell(comments[section]), ""]
    out += table(("key", "default", "meaning"),
                 ((f"`{k}`", code(v), cell(described[k])) for k, v in items))

  out += ["## Models (`model.name`)", "",
          "Each model's fields are set beside its name, e.g. "
          "`config.model = dict(name='cnn', features=(32, 64))`; `num_outputs` comes from the "
          "data.", ""]
  for name in MODELS.names():
    cls = MODELS.get(name)
    options = ", ".join(f"{k}={v!r}" for k, v in model_options(cls).items())
    out += [f"### `{name}`", "", summary(cls), "", f"Fields: `{options}`" if options else
            "No fields.", ""]

  out += ["## Tasks (`task.name`)", ""]
  out += table(("name", "options (task.*)", "description"),
               ((f"`{n}`", cell(", ".join(f"`{k}={v!r}`" for k, v in
                                          TASKS.get(n).OPTIONS.items())),
                 cell(summary(TASKS.get(n)))) for n in TASKS.names()))
  out += ["## Optimizers (`optimizer.name`)", "",
          "Every optimizer takes `optimizer.learning_rate`, `schedule`, `weight_decay` and "
          "`clip_norm`; the other `optimizer.*` keys above say which optimizers read them.", ""]
  out += table(("name", "description"), ((f"`{n}`", cell(summary(OPTIMIZERS.get(n))))
                                         for n in OPTIMIZERS.names()))
  out += ["## Schedules (`optimizer.schedule`)", ""]
  out += table(("name", "description"), ((f"`{n}`", cell(summary(SCHEDULES.get(n))))
                                         for n in SCHEDULES.names()))
  out += ["## Transforms (`data.transforms` entries)", "",
          "Each entry is `dict(name=..., **options)`. Fitted transforms learn their statistics "
          "on the train split; augmentations apply to training batches only.", ""]
  out += table(("name", "options", "description"),
               ((f"`{n}`", options_of(TRANSFORMS.get(n)), cell(summary(TRANSFORMS.get(n))))
                for n in TRANSFORMS.names()))
  out += ["## Regularizers (`regularizers` entries)", "",
          "Each entry is `dict(name=..., **options)`, e.g. `dict(name='l2', amount=1e-4)`.", ""]
  out += table(("name", "options", "description"),
               ((f"`{n}`", options_of(REGULARIZERS.get(n)), cell(summary(REGULARIZERS.get(n))))
                for n in REGULARIZERS.names()))
  out += ["## Datasets (`data.source`)", "",
          "`bundled:NAME[/CONFIG][/key=value,...]` (offline, prepared on first use into "
          "`data.data_dir`), `tfds:NAME[/CONFIG][:VERSION]` (a TFDS dataset prepared beforehand "
          "as ArrayRecord; deepflow never downloads at run time) or `synthetic:NAME` (in memory, "
          "for tests).", ""]
  rows = []
  for name in sorted(BUILDERS):
    configs = [c.name for c in (BUILDERS[name].BUILDER_CONFIGS or [])]
    rows.append((f"`bundled:{name}`", cell(", ".join(f"`{c}`" for c in configs)),
                 cell(summary(BUILDERS[name]))))
  rows += [(f"`{n}`", options_of(DATASETS.get(n), skip=("seed",)), cell(summary(DATASETS.get(n))))
           for n in DATASETS.names()]
  out += table(("source", "configs / options", "description"), rows)
  out += ["## Activations", "",
          "Names accepted wherever a model has an `activation` field: " +
          ", ".join(f"`{n}`" for n in ACTIVATIONS.names()) + ".", ""]
  return "\n".join(out)


def main(argv: list[str]) -> int:
  text = render()
  if "--check" in argv[1:]:
    with open(OUTPUT) as f:
      stale = f.read() != text
    if stale:
      print(f"{OUTPUT} is stale; run python tools/gen_config_docs.py", file=sys.stderr)
    return int(stale)
  os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
  with open(OUTPUT, "w") as f:
    f.write(text)
  print(f"wrote {OUTPUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
