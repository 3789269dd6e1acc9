"""Training batches: prepared uint8 images held on the training device, served in a resumable order.

The sampler's whole state is two integers (epoch, cursor), saved in every training checkpoint.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch

__all__ = ["SliceBank"]


class SliceBank:
    """Prepared uint8 images held on a device, served as float batches (B, 1, S^d) in [0, 1].

    Order: one permutation per epoch, seeded by (seed, epoch) and identical on every rank; rank r
    takes every world-th element from position r (equal lengths, remainder dropped).  The sampler
    state is just (epoch, cursor), so resuming is exact.
    """

    def __init__(self, images, batch_size: int, device=None, seed: int = 0, rank: int = 0, world: int = 1):
        data = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if data.dtype != torch.uint8:
            raise TypeError(f"SliceBank wants uint8 images, got {data.dtype}")
        if data.shape[0] < 1:
            raise ValueError("SliceBank got no images")
        self.data = data.to(device) if device is not None else data
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), int(rank), int(world)
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def __len__(self):
        return int(self.data.shape[0])

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self), generator=g)
        if len(self) < self.world:
            perm = perm.repeat(math.ceil(self.world / len(self)))
        per = perm.numel() // self.world
        return perm[self.rank::self.world][:per]

    def next_indices(self) -> torch.Tensor:
        out = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self._order.numel() - self.cursor)
            out.extend(self._order[self.cursor:self.cursor + take].tolist())
            self.cursor += take
            if self.cursor >= self._order.numel():
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order()
        return torch.as_tensor(out, dtype=torch.int64)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.data[idx.to(self.data.device)]
        return (x.to(torch.float32) / 255.0).unsqueeze(1)

    def next_batch(self) -> torch.Tensor:
        return self.batch(self.next_indices())

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: Dict[str, int]):
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self._order = self._epoch_order()
