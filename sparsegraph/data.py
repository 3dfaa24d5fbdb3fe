"""Offline data sets for examples, experiments and `sparsegraph train`.

- `char_corpus`: Python's own standard-library sources as a byte-level corpus (vocabulary 256),
  split into train and validation *by file* (a file's path decides, so the split is stable).
- `digits`: scikit-learn's bundled 8x8 hand-written digits (1,797 images), upsampled to 16x16,
  split 80/20 with a fixed permutation.
Nothing is downloaded.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = (f"{os.sep}site-packages{os.sep}", f"{os.sep}test{os.sep}", f"{os.sep}tests{os.sep}",
            f"{os.sep}idlelib{os.sep}", f"{os.sep}lib2to3{os.sep}")
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if not any(s in f for s in skip))


def _is_val(path: str, val_fraction: float) -> bool:
    rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "little")
    return (h % 1000) < val_fraction * 1000


@dataclass
class TokenData:
    """A 1-D byte stream; `batch` draws random windows (x, y = x shifted by one)."""

    tokens: torch.Tensor  # (N,) int64
    block_size: int
    vocab_size: int = 256

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.block_size - 1, (batch_size,), generator=generator)
        offsets = torch.arange(self.block_size + 1)
        windows = self.tokens[starts[:, None] + offsets[None, :]]  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def __len__(self) -> int:
        return len(self.tokens)


def char_corpus(split: str = "train", block_size: int = 128, max_bytes: int | None = 8_000_000,
                val_fraction: float = 0.1) -> TokenData:
    """Standard-library Python sources as bytes; `max_bytes` caps the text read (files in sorted order)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    parts, total = [], 0
    for path in _stdlib_files():
        if _is_val(path, val_fraction) != (split == "val"):
            continue
        with open(path, "rb") as f:
            data = f.read()
        parts.append(data)
        total += len(data)
        if max_bytes and total >= (max_bytes if split == "train" else max_bytes * val_fraction):
            break
    if not parts:
        raise RuntimeError("no standard-library sources found for the character corpus")
    tokens = torch.from_numpy(np.frombuffer(b"\n".join(parts), dtype=np.uint8).astype(np.int64))
    return TokenData(tokens, block_size)


@dataclass
class ImageData:
    images: torch.Tensor  # (N, 1, H, W) float, normalised
    labels: torch.Tensor  # (N,) int64
    num_classes: int = 10

    def batches(self, batch_size: int, generator: torch.Generator, shuffle: bool = True):
        order = torch.randperm(len(self.labels), generator=generator) if shuffle else torch.arange(len(self.labels))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.images[idx], self.labels[idx]

    def __len__(self) -> int:
        return len(self.labels)


def digits(split: str = "train", size: int = 16, val_fraction: float = 0.2, hard: bool = False) -> ImageData:
    """scikit-learn's digits, upsampled (bilinear) to size x size, mean 0 / std 1.

    `hard=True` makes them harder than the near-perfectly separable original: every image shifted
    by up to 2 pixels each way and covered in Gaussian noise (sigma 1, the data's own spread),
    four such copies of each training image and one of each validation image (fixed seeds).
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(len(y) * val_fraction)
    idx = order[:n_val] if split == "val" else order[n_val:]
    x, y = x[idx], y[idx]
    if hard:
        copies = 4 if split == "train" else 1
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        x, y = x.repeat(copies, 1, 1, 1), y.repeat(copies)  # (copies * N, 1, size, size)
        shifts = torch.randint(-2, 3, (len(y), 2), generator=g)
        x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])
        x = x + torch.randn(x.shape, generator=g)
    return ImageData(x.contiguous(), y.contiguous())
