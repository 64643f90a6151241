"""Geometry of the Grassmann manifold G(1, n) on row matrices (Cho & Lee, NIPS 2017, arXiv 1709.09603).

Every function takes tensors of shape ``(..., n)``: each row (last dimension) is one point ``y`` (a unit
vector standing for the line through it) or one tangent vector ``h`` at the matching row of ``y``
(``y·h = 0``). The formulas are the paper's (section 3 and the appendix):

* projection onto the tangent space: ``h = g − (yᵀg) y``
* exponential map: ``exp_y(h) = y cos‖h‖ + (h/‖h‖) sin‖h‖``
* parallel transport of ``h1`` along the geodesic of ``h2`` (``u = h2/‖h2‖``):
  ``h1 − (uᵀh1)(y sin‖h2‖ + u (1 − cos‖h2‖))``, and for ``h1 = h2``: ``(u cos‖h‖ − y sin‖h‖)‖h‖``
* per-row gradient clipping: ``ĥ = h · min(1, ν/‖h‖)``

Where we differ from a literal transcription: the divisions by ``‖h‖`` are rewritten with
``sinc θ = sin θ / θ`` and ``(1 − cos θ)/θ² = sinc²(θ/2)/2`` so that a zero tangent (θ = 0) gives the exact
limit, not NaN; a zero row stays zero under :func:`unit`. The per-row angles and their cos/sin are
evaluated in float64 (:func:`row_angle`; float32 on devices without float64), so the maps are exact for
every angle — a step of several turns stays on the sphere and points where cos/sin say, to the rounding of
the result's dtype. Everything is plain tensor math (no host synchronisation, no data-dependent shapes); the
results are in the input's dtype (float32 or float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "clip_rows",
    "exp_map",
    "project",
    "row_angle",
    "row_dot",
    "row_norm",
    "sinc",
    "transport",
    "transport_self",
    "unit",
]


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise inner products ``aᵀb``, shape ``(..., 1)`` (kept for broadcasting)."""
    return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)


def row_norm(x: Tensor) -> Tensor:
    """Row-wise Euclidean norms, shape ``(..., 1)``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def sinc(theta: Tensor) -> Tensor:
    """``sin θ / θ`` with the limit 1 at θ = 0 (the unnormalized sinc)."""
    return torch.sinc(theta * (1.0 / math.pi))


def _angle_dtype(x: Tensor) -> torch.dtype:
    # float64 where the device has it (MPS does not); the per-row scalars cost nothing next to the rows
    return torch.float32 if x.device.type == "mps" else torch.float64


def row_angle(h: Tensor) -> Tensor:
    """Row-wise norms ``‖h‖`` (the geodesic angles), shape ``(..., 1)``, accumulated in float64.

    A float32 norm is off by a few units in the last place, which at θ = 10π moves the end point of a
    geodesic by 2e-6; accumulated in float64 it is exact to the rounding of the float32 inputs.
    """
    return torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=_angle_dtype(h))


def _safe_inverse(norm: Tensor) -> Tensor:
    """``1/norm`` where ``norm > 0``, else 0 (a zero row maps to zero, not NaN)."""
    tiny = torch.finfo(norm.dtype).tiny
    return torch.where(norm > tiny, norm.clamp_min(tiny).reciprocal(), torch.zeros_like(norm))


def unit(x: Tensor, *, return_norm: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Rows scaled to unit norm (the point of G(1, n) a row stands for). Zero rows stay zero.

    With ``return_norm`` also returns the row norms, shape ``(..., 1)``.
    """
    norm = row_norm(x)
    y = x * _safe_inverse(norm)
    return (y, norm) if return_norm else y


def project(y: Tensor, g: Tensor) -> Tensor:
    """Projection of ``g`` onto the tangent space at the unit rows ``y``: ``g − (yᵀg) y``."""
    return g - row_dot(y, g) * y


def exp_map(y: Tensor, h: Tensor) -> Tensor:
    """Exponential map ``exp_y(h) = y cos‖h‖ + h sinc‖h‖``: the point reached by following the geodesic from
    ``y`` in the tangent direction ``h`` for the angle ``‖h‖``. A zero ``h`` returns ``y``."""
    theta = row_angle(h)
    return y * torch.cos(theta).to(y.dtype) + h * sinc(theta).to(h.dtype)


def transport(y: Tensor, h1: Tensor, h2: Tensor) -> Tensor:
    """Parallel transport of the tangent vector ``h1`` at ``y`` along the geodesic ``exp_y(t h2)``, t: 0 → 1.

    ``h1 − (uᵀh1)(y sin θ + u (1 − cos θ))`` with ``u = h2/θ``, ``θ = ‖h2‖``, computed as
    ``h1 − (h1ᵀh2)(y sinc θ + h2 sinc²(θ/2)/2)`` (same value, no division by θ). A zero ``h2`` returns ``h1``.
    """
    theta = row_angle(h2)
    half = sinc(0.5 * theta)
    dtype = h1.dtype
    return h1 - row_dot(h1, h2) * (y * sinc(theta).to(dtype) + h2 * (0.5 * half * half).to(dtype))


def transport_self(y: Tensor, h: Tensor) -> Tensor:
    """Parallel transport of ``h`` along its own geodesic: ``(u cos θ − y sin θ) θ = h cos θ − y θ sin θ``.

    The result is the velocity of the geodesic at ``exp_y(h)``, tangent there, with the same norm θ.
    """
    theta = row_angle(h)
    return h * torch.cos(theta).to(h.dtype) - y * (theta * torch.sin(theta)).to(y.dtype)


def clip_rows(h: Tensor, max_norm: float | Tensor) -> Tensor:
    """Per-row clipping ``h · min(1, ν/‖h‖)``: every row longer than ``ν`` is scaled to length ``ν``.

    No boolean mask and no data-dependent shape: one scale per row, computed with ``clamp``.
    """
    norm = row_norm(h)
    scale = (max_norm * _safe_inverse(norm)).clamp(max=1.0)
    return h * scale
