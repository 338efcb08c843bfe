"""How close a quantized output is to the FP16 one."""
from typing import Dict

import torch

PSNR_IDENTICAL = 999.0  # reported for bit-identical outputs (JSON has no infinity)


def psnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR with the reference's peak-to-peak range as the signal range (latents are not in [0, 1])."""
    ref, test = ref.double(), test.double()
    mse = torch.mean((ref - test) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    if mse == 0:
        return PSNR_IDENTICAL
    return 10.0 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def rel_l2(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return (torch.linalg.vector_norm(ref - test) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(ref.double().reshape(1, -1), test.double().reshape(1, -1)).item()


def compare(ref: torch.Tensor, test: torch.Tensor) -> Dict[str, float]:
    return {"psnr_db": psnr_db(ref, test), "rel_l2": rel_l2(ref, test), "cosine": cosine(ref, test)}
