"""A three-class 2-D problem (three Gaussian blobs) and a small tanh MLP for it, float64: shared by module tests."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def blobs(count: int = 24, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(count) % 3
    centres = torch.tensor([[0.0, 2.0], [2.0, 0.0], [-2.0, -2.0]], dtype=torch.float64)
    return TensorDataset(centres[y] + 0.5 * torch.randn(count, 2, generator=generator, dtype=torch.float64), y)
