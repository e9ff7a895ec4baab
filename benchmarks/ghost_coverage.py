"""The DP-SGD step of a transformer with ghost clipping's coverage of LayerNorm, attention's
DenseGeneral projections, learned positions, class tokens and scanned blocks, against the
coverage before (Dense, Conv and Embed outside scans) and against vmapped per-example
gradients, in one run.

Three contenders, each deepflow's real jitted train step (``Experiment.train_step``) on the same
Poisson batches, built from one experiment file with ``privacy.enabled``:

* ``vmap``: per-example gradients (what ``privacy.clipping='auto'`` picked for a transformer
  while any of its parameters was uncovered),
* ``ghost, before``: ghost clipping with ``ghost_layers.layer_spec`` restricted to the families
  covered before and no scanned body listened to (``'ghost'`` forced: per-example gradients for
  the norms, projections, positions and every scanned layer),
* ``ghost``: the present coverage (every parameter of the text and ViT transformers; what
  ``'auto'`` picks now).

Each is compiled first (XLA's temporary buffer size of the compiled step is printed as its peak
working memory), then timed over ``--repeats`` interleaved windows of ``--steps`` steps; the
median window counts, and ratios are taken within each round.

    python benchmarks/ghost_coverage.py [--config experiments/text_transformer.py]
                                        [--steps 10] [--repeats 7] [KEY=VALUE ...]
    python benchmarks/ghost_coverage.py model.scan_layers=True
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import flax.linen as nn
import numpy as np

from deepflow.models import scan_taps
from deepflow.privacy import ghost_layers
from dp_step import build, machine, step_parser, time_rounds  # noqa: E402  (the script's directory)

BEFORE = (nn.Dense, nn.Conv, nn.Embed)  # the layers ghost clipping covered before
CONTENDERS = {"vmap": "vmap", "ghost, before": "ghost", "ghost": "ghost"}


@contextlib.contextmanager
def coverage(name: str):
  """Ghost clipping's coverage while a contender is traced: the families before, or all."""
  if name != "ghost, before":
    yield
    return
  spec = ghost_layers.layer_spec
  body = scan_taps.current_body
  ghost_layers.layer_spec = lambda module, *args: (
      spec(module, *args) if type(module) in BEFORE else None)
  scan_taps.current_body = lambda: None
  try:
    yield
  finally:
    ghost_layers.layer_spec, scan_taps.current_body = spec, body


def main(argv=None):
  args = step_parser(__doc__, "text_transformer.py", 10).parse_args(argv)
  print(f"load before: {os.getloadavg()}")
  runs, memory = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, clipping in CONTENDERS.items():
      overrides = [*args.overrides, "optimizer.clip_norm=0.0", f"privacy.clipping='{clipping}'"]
      with coverage(name):
        exp, state, batches = build(args.config, overrides, True, os.path.join(tmp, name))
        compiled = exp.train_step.lower(state, batches[0]).compile()
      memory[name] = compiled.memory_analysis().temp_size_in_bytes
      exp.train_step = compiled  # timed as compiled under its coverage, never retraced
      runs[name] = [exp, state, batches]
    times = time_rounds(runs, args.repeats, args.steps)
  config = runs["ghost"][0].config
  print(f"load after: {os.getloadavg()}")
  print(f"machine: {machine()}")
  print(f"model: {config.model.to_dict()}, batch {config.data.batch_size}")
  for name, seconds in times.items():
    print(f"{name:>14}: {1e3 * np.median(seconds):8.2f} ms per step (median of {args.repeats} x "
          f"{args.steps}), temporary buffers {memory[name] / 2**20:.1f} MiB")
  ghost = np.asarray(times["ghost"])
  for name in ("vmap", "ghost, before"):
    ratios = np.asarray(times[name]) / ghost
    print(f"{name} / ghost: {np.median(ratios):.2f}x "
          f"(rounds {ratios.min():.2f}-{ratios.max():.2f})")


if __name__ == "__main__":
  main()
