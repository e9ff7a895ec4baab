"""deepflow's train step vs PyTorch's (eager and torch.compile) on the same CPU, in one run.

Two models, built the same way in both frameworks (same layers, widths, AdamW, float32):

* ``cnn``: the digits CNN of experiments/digits_cnn.py (conv 32 -> max pool -> conv 64 -> max
  pool -> dense 128 -> 10) on 8x8x1 digits, dropout 0;
* ``resnet``: ResNet-20 (the ``resnet`` defaults: 3 stages of 3 basic blocks, width 16, batch
  norm) on CIFAR-shaped 32x32x3 synthetic images.

deepflow's side is its real jitted step (``Experiment.train_step``: loss, gradients, AdamW, the
non-finite guard, metrics). PyTorch's is zero_grad, forward, cross-entropy, backward,
``AdamW.step``; ``torch.compile`` compiles the model (the optimizer stays eager, the usual
setup). Every contender trains on the same fixed device-resident batches, is warmed up
(compiled) first, then timed in ``--rounds`` interleaved rounds, so a noisy neighbour slows all
alike; the median round counts. PyTorch is limited to ``--threads`` threads and XLA runs on a
CPU of that many cores. With ``--autotune`` deepflow is also timed as ``train.autotune`` sets
it up (XLA:CPU's convolutions in YNNPACK or in Eigen, whichever its own timing finds faster:
``deepflow.train.tuning``). ``XLA_FLAGS`` from the environment apply to deepflow's side and are
printed. PyTorch is a benchmark-only dependency (``pip install torch``).

    python benchmarks/vs_pytorch.py [--cases cnn:128,cnn:1024,resnet:128] [--rounds 5]
                                    [--seconds 1.0] [--no-compile] [--autotune]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile

# OpenMP threads that spin while waiting collapse when other jobs share the cores (measured on
# the shared 2-core machine: PyTorch's CNN step 130-220 ms spinning vs 31 ms passive); XLA's
# threads sleep. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np
import torch
from torch import nn

import deepflow
from deepflow.data import sources
from deepflow.train import tuning
from dp_step import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)
from resident import deepflow_step, time_round  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CIFAR_SHAPED = "synthetic:cifar_shaped"
sources.DATASETS.register(CIFAR_SHAPED)(
    functools.partial(sources.synthetic_images, shape=(32, 32, 3), train_size=1024,
                      test_size=128))


# -- deepflow ------------------------------------------------------------------------------------

def deepflow_config(model: str, batch: int, *overrides: str):
  if model == "cnn":
    return deepflow.load_config(os.path.join(ROOT, "experiments", "digits_cnn.py"),
                                ["model.dropout=0.0", f"data.batch_size={batch}", *overrides])
  return deepflow.load_config(os.path.join(ROOT, "experiments", "digits_resnet.py"),
                              [f"data.source={CIFAR_SHAPED}", "data.transforms=[]",
                               "model.stage_sizes=(3,3,3)", f"data.batch_size={batch}",
                               *overrides])


def deepflow_model_step(model: str, batch: int, workdir: str, *overrides: str):
  """A zero-argument step over fixed batches, compiled, and the example batch (numpy)."""
  step, sync, host = deepflow_step(deepflow_config(model, batch, *overrides), workdir)
  return step, sync, host[0]


# -- PyTorch -------------------------------------------------------------------------------------

def torch_cnn() -> nn.Module:
  return nn.Sequential(
      nn.Conv2d(1, 32, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.branch = nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
    self.shortcut = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    return torch.relu(self.shortcut(x) + self.branch(x))


def torch_resnet20(width: int = 16) -> nn.Module:
  layers, cin = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
  for stage in range(3):
    for b in range(3):
      cout = width * 2**stage
      layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
  return nn.Sequential(*layers)


def torch_step(model: str, example, compiled: bool):
  net = torch_cnn() if model == "cnn" else torch_resnet20()
  net.train()
  opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
  forward = torch.compile(net) if compiled else net
  x = torch.from_numpy(np.ascontiguousarray(example["inputs"].transpose(0, 3, 1, 2)))
  y = torch.from_numpy(example["targets"].astype(np.int64))
  loss_fn = nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(forward(x), y)
    loss.backward()
    opt.step()
    return loss
  for _ in range(3):  # compile (torch.compile traces on the first calls)
    step()
  return step, lambda loss: loss.item()


# -- timing --------------------------------------------------------------------------------------

def run_case(model: str, batch: int, rounds: int, seconds: float, compiled: bool, autotune: bool,
             tmp: str):
  contenders = {}
  df_step, df_sync, example = deepflow_model_step(model, batch, os.path.join(tmp, f"{model}{batch}"))
  contenders["deepflow"] = (df_step, df_sync)
  if autotune:  # train.autotune's choice of XLA:CPU convolutions, recorded in its workdir
    workdir = os.path.join(tmp, f"{model}{batch}-autotune")
    step, sync, _ = deepflow_model_step(model, batch, workdir, "train.autotune=True")
    choice = json.loads(open(os.path.join(workdir, tuning.RECORD)).read())["choice"]
    contenders[f"deepflow autotune ({choice})"] = (step, sync)
  contenders["torch eager"] = torch_step(model, example, compiled=False)
  if compiled:
    contenders["torch.compile"] = torch_step(model, example, compiled=True)
  # Steps per round: about ``seconds`` of the first contender's step.
  steps = max(2, int(seconds / time_round(df_step, df_sync, 3)))
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, (step, sync) in contenders.items():
      times[name].append(time_round(step, sync, steps))
  return {name: float(np.median(t)) for name, t in times.items()}, steps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="cnn:128,cnn:1024,resnet:128")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed round")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--no-compile", dest="compiled", action="store_false")
  parser.add_argument("--autotune", action="store_true",
                      help="also time deepflow with train.autotune's choice of XLA options")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY "
        f"{os.environ['OMP_WAIT_POLICY']}); XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average {os.getloadavg()[0]:.2f}")
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for case in args.cases.split(","):
      model, batch = case.split(":")
      medians, steps = run_case(model, int(batch), args.rounds, args.seconds, args.compiled,
                                args.autotune, tmp)
      results[case] = medians
      cells = ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in medians.items())
      ours = [name for name in medians if name.startswith("deepflow")]
      ratios = "; ".join(f"{mine} " + ", ".join(
          f"{medians[name] / medians[mine]:.2f}x vs {name}" for name in medians
          if name not in ours) for mine in ours)
      print(f"{model} batch {batch} (median of {args.rounds} rounds x {steps} steps): {cells}; "
            f"{ratios}", flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  return results


if __name__ == "__main__":
  main()
