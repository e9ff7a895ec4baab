"""Writes tests/fixtures/tiny_cnn_pytorch.{safetensors,npz}, once: a tiny PyTorch CNN's
``state_dict`` (random weights and batch-norm statistics) and its eval-mode outputs on fixed
inputs. ``tests/weights/test_pytorch.py`` loads the weights into deepflow's ``encoder_cnn``
(``model.init_layout='pytorch'``) and checks deepflow's outputs equal these, with no torch.

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    python tools/make_pytorch_fixture.py

The network is ``encoder_cnn(widths=(4, 8))`` written in PyTorch: 3x3 conv (no bias) -> batch
norm -> ReLU, then an end-padded stride-2 3x3 conv (Flax's 'SAME' pads (0, 1) there) -> batch
norm -> ReLU, global average pooling, Linear to 10 classes.
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny_cnn_pytorch")


class TinyCNN(nn.Module):
  def __init__(self):
    super().__init__()
    self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    self.bn0 = nn.BatchNorm2d(4)
    self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # (left, right, top, bottom): Flax's SAME, stride 2
    self.conv1 = nn.Conv2d(4, 8, 3, stride=2, bias=False)
    self.bn1 = nn.BatchNorm2d(8)
    self.fc = nn.Linear(8, 10)

  def forward(self, x):
    x = torch.relu(self.bn0(self.conv0(x)))
    x = torch.relu(self.bn1(self.conv1(self.pad(x))))
    return self.fc(x.mean(dim=(2, 3)))


def main():
  torch.manual_seed(0)
  model = TinyCNN()
  with torch.no_grad():  # non-trivial statistics and affine parameters, so all are tested
    for bn in (model.bn0, model.bn1):
      bn.running_mean.normal_()
      bn.running_var.uniform_(0.5, 2.0)
      bn.weight.normal_()
      bn.bias.normal_()
  model.eval()
  inputs = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)  # NHWC
  with torch.no_grad():
    outputs = model(torch.from_numpy(inputs).permute(0, 3, 1, 2)).numpy()
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, OUT + ".safetensors")
  np.savez(OUT + ".npz", inputs=inputs, outputs=outputs)
  print(f"wrote {OUT}.safetensors and .npz (torch {torch.__version__})")


if __name__ == "__main__":
  main()
