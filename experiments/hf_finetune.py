"""Fine-tuning a pretrained Hugging Face language model (SmolLM2-135M, a Llama-family model) on
the bundled help-topic documents, with LoRA adapters on the attention's q and v projections
(``--config.model.lora.rank=0``: full fine-tuning).

Get the weights once, on a machine with network (deepflow itself downloads nothing):

    huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir checkpoints/SmolLM2-135M

Run:     deepflow train --config experiments/hf_finetune.py --workdir runs/hf_finetune
Sample:  deepflow sample --workdir runs/hf_finetune --prompt "The import statement" \\
             --num_tokens 60 --temperature 0
Export:  deepflow export --workdir runs/hf_finetune --format hf --out exported/smollm_help
         (a Hugging Face checkpoint, adapters merged, with the tokenizer: transformers loads it)

``model.init_from='hf:DIR'`` sets the whole model section from DIR/config.json (no sizes are
typed here) and the first state from its weights; ``data.tokenizer='hf:DIR'`` tokenizes with
the checkpoint's own tokenizer, so the data's ids are the model's (with ``init_from='hf:DIR'``
it is the default when DIR has a tokenizer.json). A prepared TFDS text corpus instead of the
bundled one: ``--config.data.source=tfds:wikitext/wikitext-103-raw-v1`` (``deepflow data
prepare`` it first; ``data.text_feature`` names its text feature). Another checkpoint of a
supported family (GPT-2, Llama, Mistral, Qwen2, Qwen3, TinyLlama) is another ``CHECKPOINT``.
Not measured here: this machine has no network for the weights.
"""
from deepflow.config import base_config

CHECKPOINT = "checkpoints/SmolLM2-135M"


def get_config():
  config = base_config()
  config.task.name = "language_model"
  config.model = dict(init_from=f"hf:{CHECKPOINT}",
                      lora=dict(rank=8, alpha=16.0, targets=r"attn/(q|v)/kernel$"))
  config.data.source = "bundled:text/documents"
  config.data.tokenizer = f"hf:{CHECKPOINT}"
  config.data.seq_len = 256
  config.data.transforms = []           # tokens, not features
  config.data.batch_size = 8
  config.data.eval_batch_size = 16
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3   # the adapters'; full fine-tuning wants ~5e-5
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0
  config.optimizer.clip_norm = 1.0
  config.train.steps = 200
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  return config
