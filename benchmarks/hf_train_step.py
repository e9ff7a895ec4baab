"""Training step of a GPT-2-small-shaped model (124 M parameters, random weights, float32):
deepflow's real jitted step (``Experiment.train_step`` of a run with ``model.init_from='hf:DIR'``:
loss, gradients, AdamW, the non-finite guard, metrics) vs ``transformers``' ``GPT2LMHeadModel``
with ``torch.optim.AdamW``, eager and under ``torch.compile``, on the same weights, batches and
hyperparameters, side by side in one process.

Both sides start from the checkpoint ``transformers`` saved (dropout 0 on both: deepflow's GPT-2
has no attention dropout), train on the same fixed batches (the run's own pipeline:
``bundled:text`` rows of ``--seq`` tokens, inputs and targets shifted by one) with the same
AdamW (learning rate, betas, epsilon, weight decay on every parameter, as ``torch.optim.AdamW``
decays them all) and the same loss (mean next-token cross-entropy over all positions). Before
timing, the losses are compared: the initial weights' loss on the first batch (deepflow's
``load_pretrained`` forward vs torch's) and the second step's (after one AdamW update on each
side), so the timed computation is the same (within ``TOLERANCE``, else it stops). Then
``--rounds`` interleaved rounds, the median counts. PyTorch is limited to ``--threads`` threads; XLA uses the machine's cores.

    python benchmarks/hf_train_step.py [--seq 256] [--batch 8] [--rounds 3] [--steps 1]
                                       [--no-compile]

Needs torch and transformers.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

# See vs_pytorch.py: spinning OpenMP threads collapse on shared cores. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np
import optax
import torch
import transformers

import deepflow
from deepflow import config as config_lib
from dp_step import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)
from resident import deepflow_step, time_round  # noqa: E402

TOLERANCE = 1e-4  # relative, on a loss: float32 sums in different orders agree far closer
ADAMW = dict(lr=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def deepflow_config(directory: str, seq: int, batch: int):
  """A run fine-tuning the checkpoint in ``directory`` (the model section is the checkpoint's)."""
  config = config_lib.base_config()
  config.task.name = "language_model"
  config.model = dict(init_from=f"hf:{directory}", dropout=0.0)
  return config_lib.finalize(config, [
      f"data.source=bundled:text/seq_len={seq}", "data.transforms=[]",
      f"data.batch_size={batch}", "optimizer.name=adamw",
      f"optimizer.learning_rate={ADAMW['lr']}", f"optimizer.b1={ADAMW['b1']}",
      f"optimizer.b2={ADAMW['b2']}", f"optimizer.eps={ADAMW['eps']}",
      f"optimizer.weight_decay={ADAMW['weight_decay']}", "optimizer.weight_decay_mask=.",
      "train.progress=False"])


def torch_step(directory: str, host: list, compiled: bool):
  """(step, sync, first two losses): zero_grad, forward, cross-entropy, backward, AdamW on the
  host batches in turn; ``torch.compile`` compiles the model (the optimizer stays eager)."""
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).train()
  opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                          eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
  forward = torch.compile(model) if compiled else model
  batches = [(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
             for b in host]
  count = [0]

  def step():
    inputs, targets = batches[count[0] % len(batches)]
    count[0] += 1
    opt.zero_grad(set_to_none=True)
    logits = forward(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    opt.step()
    return loss
  losses = [step().item(), step().item()]  # also compiles (torch.compile traces on first calls)
  return step, lambda loss: loss.item(), losses


def initial_loss(directory: str, batch) -> float:
  """The checkpoint's mean next-token loss on ``batch``, through ``deepflow.load_pretrained``."""
  model, variables = deepflow.load_pretrained(directory)
  logits = jax.jit(model.apply)(variables, batch["inputs"])
  return float(optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["targets"].astype(np.int32)).mean())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1, help="steps in one timed round")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--no-compile", dest="compiled", action="store_false",
                      help="skip torch.compile (minutes to compile on 2 cores)")
  args = parser.parse_args(argv)
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; load average {os.getloadavg()}", flush=True)
  reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.join(tmp, "gpt2")
    reference.save_pretrained(directory)
    del reference
    start = time.perf_counter()
    df_step, df_sync, host = deepflow_step(deepflow_config(directory, args.seq, args.batch),
                                           os.path.join(tmp, "run"))
    print(f"deepflow: built and compiled in {time.perf_counter() - start:.1f} s", flush=True)
    df_losses = [initial_loss(directory, host[0]), float(df_sync(df_step())["loss"])]
    contenders = {"deepflow": (df_step, df_sync)}
    for name, compiled in (("torch eager", False), ("torch.compile", True)):
      if compiled and not args.compiled:
        print("torch.compile: skipped (--no-compile)")
        continue
      start = time.perf_counter()
      step, sync, losses = torch_step(directory, host, compiled)
      print(f"{name}: first two steps (with compilation) {time.perf_counter() - start:.1f} s; "
            f"losses {losses[0]:.6f}, {losses[1]:.6f} vs deepflow's {df_losses[0]:.6f}, "
            f"{df_losses[1]:.6f} (differences {abs(losses[0] - df_losses[0]):.1e}, "
            f"{abs(losses[1] - df_losses[1]):.1e})", flush=True)
      if not np.allclose(losses, df_losses, rtol=TOLERANCE, atol=0.0):
        raise SystemExit(f"{name} does not compute deepflow's step: losses differ")
      contenders[name] = (step, sync)
    times = {name: [] for name in contenders}
    for r in range(args.rounds):
      for name, (step, sync) in contenders.items():
        times[name].append(time_round(step, sync, args.steps))
      print(f"round {r + 1}: " + ", ".join(f"{n} {1e3 * t[-1]:.0f} ms" for n, t in times.items())
            + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
  medians = {name: float(np.median(t)) for name, t in times.items()}
  print(f"GPT-2 small (124 M), float32, batch {args.batch} x {args.seq} tokens, AdamW, median of "
        f"{args.rounds} rounds x {args.steps} steps: "
        + ", ".join(f"{n} {1e3 * t:.0f} ms" for n, t in medians.items()) + "; deepflow "
        + ", ".join(f"{medians[n] / medians['deepflow']:.2f}x vs {n}" for n in medians
                    if n != "deepflow")
        + f"; load average after {os.getloadavg()}")
  return medians


if __name__ == "__main__":
  main()
