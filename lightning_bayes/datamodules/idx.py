"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped.

Byte 3 of the header is the number of dimensions, then one big-endian uint32 per dimension, then the
uint8 data (LeCun et al., http://yann.lecun.com/exdb/mnist/).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def read_idx(path: str | Path) -> Tensor:
    """The uint8 array stored in the IDX file ``path`` (``.gz`` is decompressed), as a tensor."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of uint8 data (magic bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header promises shape {shape} ({expected} bytes) but holds {len(raw) - offset}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy())
