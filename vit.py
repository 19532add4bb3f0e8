"""
A compact Vision Transformer, in one file: the baseline the Neural Interpreter is compared with.

Paper: Alexey Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021, arXiv:2010.11929. The Neural Interpreter paper (Rahaman et al. 2021, section 4.1)
compares with a ViT of about the same number of parameters on multi-task digits.

- Patches (p x p) are linearly embedded, a learned position embedding is added, and a learned CLS
  token per dataset is prepended (as the Neural Interpreter's CLS tokens, so the two read the same
  inputs); depth pre-LayerNorm Transformer encoder layers (GELU MLP); a LayerNorm and a linear head
  read the CLS token.
- Transfer baseline (train_only): "head" fine-tunes the head alone; "cls_head" the new dataset's CLS
  token and the head; every other weight stays fixed.

Reproduce: python train.py --model vit --task digits --data_dir DIR
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 32  # set from the task
    in_channels: int = 3  # set from the task
    output_size: int = 10  # set from the task: classes
    num_domains: int = 3  # set from the task: one CLS token per dataset
    patch_size: int = 4
    width: int = 192
    depth: int = 4
    num_heads: int = 4
    mlp_size: int = 384
    train_only: str = "all"  # "all", or for transfer "head" or "cls_head"

    def __post_init__(self):
        for name in ("image_size", "in_channels", "output_size", "num_domains", "patch_size", "width", "depth",
                     "num_heads", "mlp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size or self.width % self.num_heads:
            raise ValueError("image_size must be divisible by patch_size and width by num_heads")
        if self.train_only not in ("all", "head", "cls_head"):
            raise ValueError(f"train_only must be 'all', 'head' or 'cls_head', got {self.train_only!r}")


class ViT(nn.Module):
    """forward(x (B, C, H, W), domain (B,) int64, default 0) -> logits (B, classes), internals {}."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        patches = (c.image_size // c.patch_size) ** 2
        self.patch_embedding = nn.Linear(c.in_channels * c.patch_size ** 2, c.width)
        self.position_embedding = nn.Parameter(torch.randn(1 + patches, c.width) * 0.02)
        self.cls_tokens = nn.Parameter(torch.randn(c.num_domains, c.width) * 0.02)
        layer = nn.TransformerEncoderLayer(c.width, c.num_heads, c.mlp_size, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.output_size))
        if c.train_only != "all":  # transfer: every other parameter stays as it is
            keep = ("head.",) + (("cls_tokens",) if c.train_only == "cls_head" else ())
            for name, parameter in self.named_parameters():
                parameter.requires_grad_(name.startswith(keep))

    def forward(self, x, return_internals=False, domain=None):
        if domain is None:
            domain = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        p = self.config.patch_size
        patches = self.patch_embedding(F.unfold(x, p, stride=p).transpose(1, 2))  # (B, P, D)
        tokens = torch.cat([self.cls_tokens[domain].unsqueeze(1), patches], 1) + self.position_embedding
        return self.head(self.encoder(tokens)[:, 0]), {}


if __name__ == "__main__":  # smoke test: python vit.py
    model = ViT(ViTConfig(image_size=28, in_channels=1, patch_size=7, width=32, depth=2, num_heads=2, mlp_size=64))
    logits, _ = model(torch.rand(2, 1, 28, 28))
    print(tuple(logits.shape), sum(p.numel() for p in model.parameters()))
