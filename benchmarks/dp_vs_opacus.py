"""deepflow's DP-SGD step vs Opacus's on the same CPU, same sampling, clip and noise, in one run.

The model is the digits CNN (experiments/digits_cnn.py, dropout 0; ``vs_pytorch.torch_cnn`` on
the PyTorch side), AdamW, clip norm 1, noise multiplier 1, on the bundled digits. Both train on
the same Poisson-sampled batches (``deepflow.data.sampler.PoissonBatches``, expected size
``--batch``): deepflow on its fixed-shape padded batch with a mask (its real step,
``Experiment.train_step``) twice, with ``privacy.clipping='ghost'`` (per-example norms from
layer inputs and output gradients) and ``'vmap'`` (vmapped per-example gradients), Opacus on the
sampled rows alone (the variable-size batches its ``DPDataLoader`` would give), through
``GradSampleModule`` + ``DPOptimizer`` with ``expected_batch_size``. Each contender is warmed up,
then timed in ``--rounds`` interleaved rounds; the median counts. deepflow's non-private step on
batches of ``--batch`` is timed beside them, and at the padded batch's size (the rows the DP step
computes). Opacus and PyTorch are benchmark-only dependencies.

On a shared machine the load changes within a run: the ratios are taken within each round (the
contenders of one round ran back to back) and their median is reported with the range over the
rounds, beside the median step times and the load average before and after each batch size.

    python benchmarks/dp_vs_opacus.py [--batches 128,1024] [--rounds 11] [--seconds 0.5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

# OpenMP threads that spin while waiting collapse when other jobs share the cores (measured on
# the shared 2-core machine: PyTorch's CNN step 130-220 ms spinning vs 31 ms passive); XLA's
# threads sleep. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np
import opacus
import torch

import deepflow
from deepflow.data.pipeline import INPUTS, MASK, TARGETS
from dp_step import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)
from resident import deepflow_step, time_round  # noqa: E402
from vs_pytorch import ROOT, torch_cnn  # noqa: E402

DP = ["privacy.enabled=True", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0",
      "privacy.target_epsilon=0"]
DP_CONTENDERS = ("deepflow DP ghost", "deepflow DP vmap")


def digits_cnn_config(batch: int, clipping: str | None):
  """The digits CNN at ``batch``; DP-SGD with ``clipping`` ('ghost', 'vmap'), or None for the
  non-private step."""
  private = [*DP, f"privacy.clipping='{clipping}'"] if clipping else []
  return deepflow.load_config(os.path.join(ROOT, "experiments", "digits_cnn.py"),
                              ["model.dropout=0.0", "optimizer.clip_norm=0.0",
                               f"data.batch_size={batch}", *private])


def opacus_step(host_batches, expected_batch: int):
  """Opacus on the real rows of deepflow's Poisson batches (masks dropped)."""
  net = opacus.GradSampleModule(torch_cnn())
  optimizer = opacus.optimizers.DPOptimizer(
      torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4), noise_multiplier=1.0,
      max_grad_norm=1.0, expected_batch_size=expected_batch)
  batches = []
  for b in host_batches:
    real = b[MASK] > 0
    batches.append((torch.from_numpy(np.ascontiguousarray(b[INPUTS][real].transpose(0, 3, 1, 2))),
                    torch.from_numpy(b[TARGETS][real].astype(np.int64))))
  loss_fn = torch.nn.CrossEntropyLoss()
  count = [0]

  def step():
    x, y = batches[count[0] % len(batches)]
    count[0] += 1
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    optimizer.step()
    return loss
  for _ in range(2):
    step()
  return step, lambda loss: loss.item()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="128,1024")
  parser.add_argument("--rounds", type=int, default=11)
  parser.add_argument("--seconds", type=float, default=0.5)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  warnings.filterwarnings("ignore", module="opacus")
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY "
        f"{os.environ['OMP_WAIT_POLICY']}), opacus {opacus.__version__}; "
        f"load average {os.getloadavg()[0]:.2f}")
  with tempfile.TemporaryDirectory() as tmp:
    for batch in map(int, args.batches.split(",")):
      ghost_step, ghost_sync, host = deepflow_step(
          digits_cnn_config(batch, "ghost"), os.path.join(tmp, f"ghost{batch}"), 8)
      contenders = {
          "deepflow DP ghost": (ghost_step, ghost_sync),
          "deepflow DP vmap": deepflow_step(digits_cnn_config(batch, "vmap"),
                                            os.path.join(tmp, f"vmap{batch}"), 8)[:2],
          "Opacus": opacus_step(host, batch),
          "deepflow non-private": deepflow_step(digits_cnn_config(batch, None),
                                                os.path.join(tmp, f"plain{batch}"), 8)[:2],
          # The DP step computes every row of its padded batch: the same step without privacy
          # on that many rows is the floor for it.
          "deepflow non-private, padded size": deepflow_step(
              digits_cnn_config(host[0][MASK].shape[0], None), os.path.join(tmp, f"pad{batch}"),
              8)[:2]}
      steps = max(2, int(args.seconds / time_round(ghost_step, ghost_sync, 3)))
      load = os.getloadavg()[0]
      times = {name: [] for name in contenders}
      for _ in range(args.rounds):
        for name, (step, sync) in contenders.items():
          times[name].append(time_round(step, sync, steps))
      times = {name: np.array(t) for name, t in times.items()}
      sizes = [int(b[MASK].sum()) for b in host]
      plain, ghost = times["deepflow non-private"], times["deepflow DP ghost"]
      print(f"batch {batch} (Poisson: padded to {host[0][MASK].shape[0]} rows, sampled "
            f"{min(sizes)}-{max(sizes)}; {args.rounds} rounds x {steps} steps; load "
            f"{load:.2f} -> {os.getloadavg()[0]:.2f})", flush=True)
      for name, t in times.items():
        print(f"  {name}: {1e3 * np.median(t):.2f} ms (median; rounds "
              f"{1e3 * t.min():.2f}-{1e3 * t.max():.2f})")
      ratios = {f"Opacus / {k}": times["Opacus"] / times[k] for k in DP_CONTENDERS}
      ratios.update({f"{k} / non-private": times[k] / plain
                     for k in DP_CONTENDERS})
      ratios["deepflow DP ghost / non-private at the padded size"] = (
          ghost / times["deepflow non-private, padded size"])
      for name, r in ratios.items():
        print(f"  {name}: {np.median(r):.2f}x (median of per-round ratios; range "
              f"{r.min():.2f}-{r.max():.2f})", flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
