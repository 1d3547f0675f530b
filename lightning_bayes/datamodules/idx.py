"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped.

Header: two zero bytes, a type byte (0x08 = uint8), byte 3 = the number of dimensions, then one
big-endian uint32 per dimension; then the uint8 data (LeCun et al., http://yann.lecun.com/exdb/mnist/).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> Tensor:
    """The uint8 array stored in the IDX file ``path`` as a tensor (gzip is recognised by its magic bytes)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is a damaged gzip file ({error})") from error
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of uint8 data (magic bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path}: header promises {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header promises shape {shape} ({expected} bytes) but holds {len(raw) - offset}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy())
