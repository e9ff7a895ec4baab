"""Distilling a pretrained Hugging Face language model (SmolLM2-135M, a Llama-family model) into
a small deepflow ``transformer_lm`` (4 layers of 256, tied embeddings: 16M parameters, 8x fewer)
on the bundled help-topic documents, tokenized by the checkpoint's own tokenizer so that the
student's ids are the teacher's.

Get the weights once, on a machine with network (deepflow itself downloads nothing):

    huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir checkpoints/SmolLM2-135M

Run:     deepflow train --config experiments/hf_distill.py --workdir runs/hf_distill

``task.teacher='hf:DIR'`` reads the checkpoint with ``deepflow.load_pretrained``; its weights
are constants of the student's train step (frozen, evaluated on the same batch). The student's
logits cover the tokenizer's vocabulary; a checkpoint vocabulary padded past it is cut to it.
Building the student checks the teacher in one line each: its inputs (positions), its
vocabulary, its tokenizer against ``data.tokenizer``. Not measured here: this machine has no
network for the weights (``experiments/text_distill.py`` distils from a deepflow run instead).
"""
from deepflow.config import base_config

CHECKPOINT = "checkpoints/SmolLM2-135M"


def get_config():
  config = base_config()
  config.task = dict(name="distillation", teacher=f"hf:{CHECKPOINT}", temperature=2.0,
                     hard_weight=0.5)
  config.model = dict(name="transformer_lm", d_model=256, num_heads=4, num_layers=4,
                      mlp_dim=1024, max_len=256, tie_embeddings=True)
  config.data.source = "bundled:text/documents"
  config.data.tokenizer = f"hf:{CHECKPOINT}"
  config.data.seq_len = 256
  config.data.transforms = []           # tokens, not features
  config.data.batch_size = 16
  config.data.eval_batch_size = 32
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.01
  config.optimizer.clip_norm = 1.0
  config.train.steps = 2000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
