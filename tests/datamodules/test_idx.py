"""The IDX reader against hand-written files: header parsing, gzip, and clear errors naming the file."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from lightning_bayes.datamodules.idx import read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_reads_plain_and_gzipped_files_of_any_rank(tmp_path: Path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain, zipped = tmp_path / "cube-idx3-ubyte", tmp_path / "cube-idx3-ubyte.gz"
    plain.write_bytes(_idx_bytes(array))
    zipped.write_bytes(gzip.compress(_idx_bytes(array)))
    for path in (plain, zipped):
        read = read_idx(path)
        assert read.shape == (2, 3, 4) and read.numpy().tobytes() == array.tobytes()
    # gzip is recognised by its magic bytes, not by the file name
    unnamed = tmp_path / "labels"
    unnamed.write_bytes(gzip.compress(_idx_bytes(np.array([7, 8, 9], dtype=np.uint8))))
    assert read_idx(unnamed).tolist() == [7, 8, 9]


def test_size_mismatch_names_the_file_and_the_promised_shape(tmp_path: Path):
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 7]))
    with pytest.raises(ValueError, match=r"short-idx1-ubyte: header promises shape \(4,\)"):
        read_idx(short)
    cut_header = tmp_path / "cut"
    cut_header.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="cut: header promises 3 dimensions"):
        read_idx(cut_header)


def test_wrong_magic_and_damaged_gzip_are_named(tmp_path: Path):
    archive = tmp_path / "archive.zip"
    archive.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"archive.zip is not an IDX file of uint8 data \(magic bytes 504b0304\)"):
        read_idx(archive)
    floats = tmp_path / "floats"
    floats.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\x00" * 4)
    with pytest.raises(ValueError, match="floats is not an IDX file"):
        read_idx(floats)
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(gzip.compress(_idx_bytes(np.zeros(100, dtype=np.uint8)))[:20])
    with pytest.raises(ValueError, match="damaged.gz is a damaged gzip file"):
        read_idx(damaged)
