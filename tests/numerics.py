"""Float tolerances derived from magnitudes, not tuned on one machine.

A float32 result that sums n terms carries a rounding error of order sqrt(n) ulps of the terms'
magnitude, in an order that depends on the CPU's BLAS kernels (OpenBLAS / MKL, AVX2 / AVX-512 pick
different blockings). So a float32 result is compared against a float64 reference of the same maths,
with a tolerance of k * sqrt(n) float32 ulps of the largest |reference value|: loose enough for any
summation order, still orders of magnitude below the error of a real bug.
"""
from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps


def fp32_tolerance(reference: torch.Tensor, n_terms: int, k: float = 4.0) -> float:
    """k * sqrt(n_terms) float32 ulps of max |reference|."""
    return k * math.sqrt(n_terms) * EPS32 * float(reference.abs().max())


def assert_fp32_close(got: torch.Tensor, reference: torch.Tensor, n_terms: int, k: float = 4.0, what: str = "") -> None:
    """`got` (a float32 computation) is within fp32_tolerance of `reference` (the same maths in float64)."""
    assert reference.dtype == torch.float64, "the reference must be float64"
    assert got.shape == reference.shape, (what, got.shape, reference.shape)
    err = float((got.detach().double() - reference.detach()).abs().max())
    tol = fp32_tolerance(reference.detach(), n_terms, k)
    assert err <= tol, f"{what}: max |error| {err:.3g} > {tol:.3g} ({k} x sqrt({n_terms}) fp32 ulps of " \
                       f"max |reference| {float(reference.abs().max()):.3g})"
