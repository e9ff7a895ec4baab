"""Vision Transformer (Dosovitskiy et al., 2021) sized for small images."""
from __future__ import annotations

import flax.linen as nn
import jax

from deepflow.models.layers import (ClassToken, PositionalEmbedding, block_stack, in_scope,
                                    require_images)
from deepflow.registry import ConfigError, MODELS

POOLINGS = ("cls", "mean")


@MODELS.register("vit")
class ViT(nn.Module):
  """NHWC images cut into ``patch_size`` x ``patch_size`` patches (a strided conv), linearly
  embedded, plus learned positions, through pre-LN transformer blocks shared with
  ``transformer.py``; pooled by a class token (``'cls'``) or the mean of the patches
  (``'mean'``), then a linear head. The patch size must divide the image size.

  ``norm_eps``, ``qkv_bias``, ``split_qkv`` and ``activation='gelu_exact'`` give the layout
  and numerics of Hugging Face's ViT (``deepflow.hf.vit``); ``image_size`` > 0 fixes the input
  size, as a checkpoint's position table does."""
  num_outputs: int
  patch_size: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 4
  mlp_dim: int = 128
  pooling: str = "cls"
  activation: str = "gelu"
  dropout: float = 0.0
  remat_policy: str = "none"   # none, full, or a jax.checkpoint_policies name (dots_saveable)
  scan_layers: bool = False    # nn.scan over the blocks: stacked parameters, flat compile time
  norm_eps: float = 1e-6       # the layer norms' epsilon
  qkv_bias: bool = True        # biases on the query, key and value projections
  split_qkv: bool = False      # query/key/value as three kernels rather than one (layers.py)
  image_size: int = 0          # > 0: inputs must be image_size x image_size; 0: any size

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    require_images(x, "vit")
    if self.pooling not in POOLINGS:
      raise ConfigError(f"unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")
    height, width, p = x.shape[1], x.shape[2], self.patch_size
    if p < 1 or height % p or width % p:
      raise ConfigError(f"image size {height}x{width} is not divisible by patch_size {p}")
    if self.image_size and (height, width) != (self.image_size, self.image_size):
      raise ConfigError(f"vit takes {self.image_size}x{self.image_size} images (image_size), got "
                        f"{height}x{width}: resize them in data.transforms")
    x = nn.Conv(self.d_model, (p, p), strides=(p, p), padding="VALID", name="patches")(x)
    x = x.reshape(x.shape[0], -1, self.d_model)
    if self.pooling == "cls":
      x = in_scope(self, ClassToken())(x)
    x = in_scope(self, PositionalEmbedding("learned", x.shape[1], "positions"))(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = block_stack(x, train, num_layers=self.num_layers, scan=self.scan_layers,
                    remat_policy=self.remat_policy, num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim, dropout=self.dropout, activation=self.activation,
                    norm_eps=self.norm_eps, qkv_bias=self.qkv_bias, split_qkv=self.split_qkv)
    x = nn.LayerNorm(epsilon=self.norm_eps, name="final_norm")(x)
    x = x[:, 0] if self.pooling == "cls" else x.mean(axis=1)
    return nn.Dense(self.num_outputs, name="head")(x)
