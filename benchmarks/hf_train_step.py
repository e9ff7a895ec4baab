"""Training step of a GPT-2-small-shaped model (124 M parameters, random weights, float32):
deepflow's real jitted step (``Experiment.train_step`` of a run with ``model.init_from='hf:DIR'``:
loss, gradients, AdamW, the non-finite guard, metrics) vs ``transformers``' ``GPT2LMHeadModel``
with ``torch.optim.AdamW``, eager and under ``torch.compile``, on the same weights, batches and
hyperparameters, side by side in one process.

Every contender starts from the checkpoint ``transformers`` saved (dropout 0: deepflow's GPT-2
has no attention dropout), trains on the same fixed batches (the run's own pipeline:
``bundled:text`` rows of ``--seq`` tokens, inputs and targets shifted by one) with the same
AdamW (learning rate, betas, epsilon, weight decay on every parameter, as ``torch.optim.AdamW``
decays them all) and the same loss (mean next-token cross-entropy over all positions). A fourth
contender, the same step hand-written in JAX, separates deepflow's own cost from XLA's. Before
timing, the losses are compared: the first step's (the initial weights on the first batch) and
the second step's (after one AdamW update), so every contender computes the same step (within
``TOLERANCE``, else it stops). Then ``--rounds`` interleaved rounds; the median counts. PyTorch
is limited to ``--threads`` threads; XLA uses the machine's cores.

    python benchmarks/hf_train_step.py [--seq 256] [--batch 8] [--rounds 3] [--steps 1]
                                       [--no-compile]

Needs torch and transformers.
"""
from __future__ import annotations

import argparse
import functools
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


def jax_step(directory: str, host: list):
  """(step, sync, first two losses): the same step hand-written in JAX (``jax.jit`` of loss,
  gradients and ``optax.adamw`` on ``deepflow.load_pretrained``'s model, state donated), the
  baseline that separates deepflow's own cost from XLA's."""
  model, variables = deepflow.load_pretrained(directory)
  opt = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                    weight_decay=ADAMW["weight_decay"], mask=None)

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"].astype(np.int32)).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batches = [jax.device_put(b) for b in host]
  state = [variables["params"], opt.init(variables["params"]), 0]

  def step():
    state[0], state[1], loss = update(state[0], state[1], batches[state[2] % len(batches)])
    state[2] += 1
    return loss
  losses = [float(step()), float(step())]
  return step, jax.block_until_ready, losses


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
  pretrained = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.join(tmp, "gpt2")
    pretrained.save_pretrained(directory)
    del pretrained
    start = time.perf_counter()
    df_step, df_sync, host = deepflow_step(deepflow_config(directory, args.seq, args.batch),
                                           os.path.join(tmp, "run"))
    print(f"deepflow: built and compiled in {time.perf_counter() - start:.1f} s", flush=True)
    contenders = {"deepflow": (df_step, df_sync)}
    df_loss = float(df_sync(df_step())["loss"])  # its second step's (the first compiled it)
    reference = None
    for name, make in (("jax + optax by hand", lambda: jax_step(directory, host)),
                       ("torch eager", lambda: torch_step(directory, host, False)),
                       ("torch.compile", lambda: torch_step(directory, host, True))):
      if name == "torch.compile" and not args.compiled:
        print("torch.compile: skipped (--no-compile)")
        continue
      start = time.perf_counter()
      step, sync, losses = make()
      reference = reference or [losses[0], df_loss]  # the hand-written step's first loss
      print(f"{name}: first two steps (with compilation) {time.perf_counter() - start:.1f} s; "
            f"losses {losses[0]:.6f}, {losses[1]:.6f} vs {reference[0]:.6f}, {reference[1]:.6f} "
            f"(differences {abs(losses[0] - reference[0]):.1e}, "
            f"{abs(losses[1] - reference[1]):.1e})", flush=True)
      if not np.allclose(losses, reference, rtol=TOLERANCE, atol=0.0):
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
