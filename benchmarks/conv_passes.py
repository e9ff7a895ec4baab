"""The three passes of a 3x3 convolution (forward, input gradient, kernel gradient) in deepflow's
CPU convolution vs PyTorch's, per shape of the models ``vs_pytorch.py`` compares, in one run.

deepflow's side is ``deepflow.models.conv.conv_general_dilated`` jitted with deepflow's CPU
compiler options (``deepflow.train.tuning.PLATFORM_DEFAULTS``), its gradients taken by
``jax.vjp``: the programs a train step contains. PyTorch's side is ``conv2d`` and
``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` on the same values in NCHW, PyTorch's own
layout. Both are timed in ``--rounds`` interleaved rounds; PyTorch is limited to ``--threads``
threads and XLA runs on a CPU of that many cores. Each pass prints both times, the ratio
(PyTorch / deepflow: above 1 is deepflow faster) and deepflow's GFLOP/s counted as 2 x the
multiply-adds of the whole 3x3 window at every output, padding taps included (XLA's
``cost_analysis`` leaves those out: at 4x4 images 0.69 of the taps are real).

The shapes are the digits CNN's second convolution (batch 1024) and ResNet-20's three stages
(batch 128), where the train steps of ``vs_pytorch.py`` spend most of their time. PyTorch is a
benchmark-only dependency (``pip install torch``).

    python benchmarks/conv_passes.py [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in vs_pytorch.py; before torch loads

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from deepflow.models.conv import conv_general_dilated
from deepflow.train import tuning
from dp_step import machine  # noqa: E402  (benchmarks/ is the script's directory)
from resident import time_round  # noqa: E402

# (name, batch, height = width, input channels, output channels), stride 1, SAME padding.
SHAPES = (("digits CNN conv 2", 1024, 4, 32, 64),
          ("ResNet-20 stage 0", 128, 32, 16, 16),
          ("ResNet-20 stage 1", 128, 16, 32, 32),
          ("ResNet-20 stage 2", 128, 8, 64, 64))
PASSES = ("forward", "input gradient", "kernel gradient")


def deepflow_passes(x, w, g):
  """The three passes, compiled with deepflow's CPU options, as calls on (x, w, g)."""
  def conv(x, w):
    return conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fns = (lambda x, w, g: conv(x, w),
         lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
         lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  options = tuning.PLATFORM_DEFAULTS["cpu"]
  compiled = [jax.jit(f).lower(x, w, g).compile(compiler_options=options) for f in fns]
  return [lambda c=c: c(x, w, g) for c in compiled]


def torch_passes(x, w, g):
  xt, gt = (torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous() for a in (x, g))
  wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous()
  return [lambda: F.conv2d(xt, wt, padding=1),
          lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, padding=1),
          lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, padding=1)]


def run_shape(name, batch, size, cin, cout, rounds: int, repeats: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.1)
  g = jnp.asarray(rng.standard_normal((batch, size, size, cout), np.float32))
  ours, theirs = deepflow_passes(x, w, g), torch_passes(x, w, g)
  for fn in ours:  # warm up
    jax.block_until_ready(fn())
  for fn in theirs:
    fn()
  flops = 2 * batch * size * size * 9 * cin * cout
  for label, a, b in zip(PASSES, ours, theirs):
    times = [(time_round(a, jax.block_until_ready, repeats),
              time_round(b, lambda out: None, repeats))  # PyTorch's CPU ops return done
             for _ in range(rounds)]
    t_ours = statistics.median(t for t, _ in times)
    t_theirs = statistics.median(t for _, t in times)
    ratio = statistics.median(t2 / t1 for t1, t2 in times)
    print(f"{name:18} {label:16} deepflow {t_ours * 1e3:6.2f} ms ({flops / t_ours / 1e9:4.0f} "
          f"GFLOP/s)  PyTorch {t_theirs * 1e3:6.2f} ms  PyTorch/deepflow {ratio:.2f}x",
          flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=5, help="calls per timed round")
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  print(f"machine: {machine()}, load {os.getloadavg()[0]:.1f}; torch {torch.__version__} on "
        f"{args.threads} threads; XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}; "
        f"{args.rounds} rounds of {args.repeats} calls")
  for shape in SHAPES:
    run_shape(*shape, args.rounds, args.repeats)


if __name__ == "__main__":
  main()
