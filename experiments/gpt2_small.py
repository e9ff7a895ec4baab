"""A GPT-2-small-size decoder-only language model: 12 pre-LN blocks of width 768 with 12 heads,
an MLP of 3072, context 1024 and GPT-2's 50,257-entry vocabulary (124 M parameters), trained
with AdamW, cosine decay, bf16 compute and ``nn.scan`` over the blocks. The text is the bundled
character stream (``bundled:text`` in 1024-character chunks, 103 of the 50,257 ids used): a
stand-in that makes the file run anywhere; point ``data.source`` at a tokenized corpus for a
real run.

Plan:   deepflow plan --config experiments/gpt2_small.py --topology v5e:2x4
Run:    deepflow train --config experiments/gpt2_small.py --workdir runs/gpt2_small
        on a TPU slice (v5e-8 as planned below: 5.44 GiB per chip) or several GPUs. On one
        device the global batch of 32 needs 39.4 GiB for its train step: on a CPU machine
        ``deepflow train`` says so before it starts and names the largest batch that fits (12
        on a 2-core x86_64 CPU machine with 17.6 GiB available).

Planned, not trained (``deepflow plan --nosearch_batch``, compiled for TPU v5e-8 (v5e:2x4) on
a 2-core CPU machine with libtpu 0.0.42, jax 0.10.2): 124,519,015 parameters; data parallel over
8 chips, global batch 32 x 1024 tokens; per device 0.46 GiB parameters, 0.93 GiB AdamW state,
4.05 GiB activations/temporaries, peak 5.44 GiB of 16: fits, 10.56 GiB free. XLA counts
2.60e12 FLOPs per device per step (6 x parameters x tokens would be 3.06e12) and 5.7e10 bytes
accessed: a roofline step of 70 ms, memory-bound by that byte count (compute alone 13 ms), an
MFU bound of 19%.
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.task.name = "language_model"
  config.model = dict(name="transformer_lm", vocab_size=50257, d_model=768, num_heads=12,
                      num_layers=12, mlp_dim=3072, max_len=1024, scan_layers=True,
                      remat_policy="dots_saveable")
  config.data.source = "bundled:text/seq_len=1024"
  config.data.transforms = []
  config.data.batch_size = 32
  config.data.eval_batch_size = 32
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 6e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.1
  config.optimizer.b2 = 0.95
  config.optimizer.clip_norm = 1.0
  config.train.steps = 5000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.compute_dtype = "bfloat16"
  return config
