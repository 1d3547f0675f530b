"""A canonical form of LoRA factors: one representative of each ``GL(r)`` orbit ``{(B S, S^-1 A)}``.

A LoRA update ``Delta W = B A`` (``B: out x r``, ``A: r x in``) does not change under ``B -> B S``,
``A -> S^-1 A`` for any invertible ``S``, so two independently trained adapters can sit far apart in
``(A, B)`` space while computing the same function; a straight line or curve between them then passes
through needless barriers. The balanced SVD form removes the gauge: with the thin SVD
``B A = U diag(s) V^T``, ``B' = U diag(sqrt(s))`` and ``A' = diag(sqrt(s)) V^T``, each pair of singular
vectors signed so that the largest-magnitude entry of ``u_k`` is positive. ``B' A' = B A``, and every
member of an orbit maps to the same pair (for distinct non-zero singular values). The SVD is that of the
``r x r`` core ``R_B R_A^T`` of the QR factors ``B = Q_B R_B``, ``A^T = Q_A R_A``, never of ``out x in``.
LoRA-Curve (Dold et al., 2026) canonicalises adapters before anchoring a curve between them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_lora(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(A', B')`` in balanced SVD form with ``B' A' = B A``, for ``A: r x in`` and ``B: out x r``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"a must be r x in and b out x r with the same r; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    dtype = a.dtype
    a64, b64 = a.double(), b.double()
    q_b, r_b = torch.linalg.qr(b64)
    q_a, r_a = torch.linalg.qr(a64.T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    u, v = q_b @ u_core, q_a @ vh_core.T
    largest = u.abs().argmax(0)
    signs = torch.sign(u.gather(0, largest.unsqueeze(0))).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u, v, root = u * signs, v * signs, s.sqrt()
    return (root.unsqueeze(1) * v.T).to(dtype), (u * root).to(dtype)


def balanced_lora_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Named tensors (e.g. a state dict) with each peft ``lora_A`` / ``lora_B`` pair in balanced SVD form (every
    product ``B A`` unchanged); a factor whose partner is missing is refused."""
    result = dict(tensors)
    for name in tensors:
        if "lora_A" not in name and "lora_B" not in name:
            continue
        partner = name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B", "lora_A")
        if partner not in tensors:
            raise ValueError(
                f"both LoRA factors of a layer are needed; {name!r} is given but {partner!r} is not "
                "(CurveTraining(canonical_lora=True) needs params='lora')"
            )
        if "lora_A" in name:
            result[name], result[partner] = balanced_lora(tensors[name], tensors[partner])
    return result
