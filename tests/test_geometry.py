"""normkit.geometry against float64 transcriptions of the paper's formulas, and the manifold's invariants."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit import geometry as geo

# --- literal float64 transcriptions (numpy, one row at a time) -------------------------------------------


def ref_unit(x):
    return x / np.linalg.norm(x)


def ref_project(y, g):
    return g - (y @ g) * y


def ref_exp(y, h):
    t = np.linalg.norm(h)
    return y * math.cos(t) + (h / t) * math.sin(t)


def ref_transport(y, h1, h2):
    t = np.linalg.norm(h2)
    u = h2 / t
    return h1 - (u @ h1) * (math.sin(t) * y + (1 - math.cos(t)) * u)


def ref_transport_self(y, h):
    t = np.linalg.norm(h)
    u = h / t
    return (u * math.cos(t) - y * math.sin(t)) * t


def tangent_batch(seed, rows=6, n=5, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    y = geo.unit(torch.randn(rows, n, generator=gen, dtype=dtype))
    h = geo.project(y, scale * torch.randn(rows, n, generator=gen, dtype=dtype))
    return y, h, gen


def per_row(fn, *arrays):
    return np.stack([fn(*rows) for rows in zip(*(a.numpy() for a in arrays))])


def test_formulas_match_literal_transcription():
    y, h1, gen = tangent_batch(0, scale=0.7)
    h2 = geo.project(y, torch.randn(6, 5, generator=gen, dtype=torch.float64))
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(geo.unit(g).numpy(), per_row(ref_unit, g), rtol=0, atol=1e-14)
    np.testing.assert_allclose(geo.project(y, g).numpy(), per_row(ref_project, y, g), rtol=0, atol=1e-14)
    np.testing.assert_allclose(geo.exp_map(y, h1).numpy(), per_row(ref_exp, y, h1), rtol=0, atol=1e-14)
    np.testing.assert_allclose(
        geo.transport(y, h1, h2).numpy(), per_row(ref_transport, y, h1, h2), rtol=0, atol=1e-14
    )
    np.testing.assert_allclose(
        geo.transport_self(y, h1).numpy(), per_row(ref_transport_self, y, h1), rtol=0, atol=1e-14
    )
    # transport of h along itself is the special case of the general transport
    torch.testing.assert_close(geo.transport(y, h1, h1), geo.transport_self(y, h1), rtol=0, atol=1e-14)


def test_unit_returns_norms_and_keeps_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y, norm = geo.unit(x, return_norm=True)
    assert torch.equal(norm, torch.tensor([[5.0], [0.0]]))
    assert torch.equal(y, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_tangent_and_zero_rows_give_no_nan(dtype):
    y = geo.unit(torch.randn(4, 3, dtype=dtype))
    zero = torch.zeros_like(y)
    assert torch.equal(geo.exp_map(y, zero), y)
    assert torch.equal(geo.transport_self(y, zero), zero)
    h = geo.project(y, torch.randn_like(y))
    assert torch.equal(geo.transport(y, h, zero), h)
    assert torch.equal(geo.clip_rows(zero, 0.1), zero)
    for out in (
        geo.unit(zero),
        geo.project(zero, h),
        geo.exp_map(zero, zero),
        geo.transport(zero, zero, zero),
    ):
        assert torch.isfinite(out).all()
    # tiny tangents: the small-angle forms are exact to rounding
    tiny = h * 1e-20
    torch.testing.assert_close(geo.exp_map(y, tiny), y)
    torch.testing.assert_close(geo.transport_self(y, tiny), tiny)


def test_clip_rows():
    h = torch.tensor([[3.0, 4.0], [0.03, 0.04], [0.0, 0.0]], dtype=torch.float64)
    out = geo.clip_rows(h, 0.1)
    torch.testing.assert_close(out[0], torch.tensor([0.06, 0.08], dtype=torch.float64))
    assert torch.equal(out[1:], h[1:])  # rows within the threshold are untouched


rows_st = st.integers(1, 5)
dim_st = st.integers(2, 9)
scale_st = st.floats(1e-6, 3.0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=rows_st, n=dim_st, angle=st.floats(1e-6, 3.1))
def test_exp_map_moves_by_the_angle_and_stays_unit(seed, rows, n, angle):
    y, h, _ = tangent_batch(seed, rows, n)
    h = geo.unit(h) * angle
    z = geo.exp_map(y, h)
    torch.testing.assert_close(geo.row_norm(z), torch.ones(rows, 1, dtype=torch.float64), rtol=0, atol=1e-12)
    theta = geo.row_norm(h)
    # geodesic distance on the sphere = angle between start and end (for angles ≤ π)
    angle = torch.atan2(geo.row_norm(z - geo.row_dot(z, y) * y), geo.row_dot(z, y))
    torch.testing.assert_close(angle, theta, rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=rows_st, n=dim_st, scale=scale_st, scale2=scale_st)
def test_transport_is_an_isometry_onto_the_new_tangent_space(seed, rows, n, scale, scale2):
    y, h1, gen = tangent_batch(seed, rows, n, scale)
    h2 = geo.project(y, scale2 * torch.randn(rows, n, generator=gen, dtype=torch.float64))
    h3 = geo.project(y, torch.randn(rows, n, generator=gen, dtype=torch.float64))
    z = geo.exp_map(y, h2)
    t1, t3 = geo.transport(y, h1, h2), geo.transport(y, h3, h2)
    atol = 1e-11
    zeros = torch.zeros(rows, 1, dtype=torch.float64)
    torch.testing.assert_close(geo.row_dot(t1, z), zeros, rtol=0, atol=atol)
    torch.testing.assert_close(geo.row_dot(t1, t3), geo.row_dot(h1, h3), rtol=0, atol=atol)
    ts = geo.transport_self(y, h2)
    torch.testing.assert_close(geo.row_norm(ts), geo.row_norm(h2), rtol=0, atol=atol)
    torch.testing.assert_close(geo.row_dot(ts, z), zeros, rtol=0, atol=atol)
    # the transported velocity is the derivative of the geodesic at its end
    eps = 1e-6
    deriv = (geo.exp_map(y, h2 * (1 + eps)) - geo.exp_map(y, h2 * (1 - eps))) / (2 * eps)
    torch.testing.assert_close(ts, deriv, rtol=0, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=rows_st, n=dim_st, nu=st.floats(1e-3, 10.0))
def test_clip_rows_bounds_norm_and_keeps_direction(seed, rows, n, nu):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, n, generator=gen, dtype=torch.float64) * torch.rand(rows, 1, generator=gen) * 5
    out = geo.clip_rows(h, nu)
    norms = geo.row_norm(h)
    torch.testing.assert_close(geo.row_norm(out), norms.clamp(max=nu), rtol=1e-12, atol=0)
    torch.testing.assert_close(geo.unit(out), geo.unit(h), rtol=0, atol=1e-12)


def test_float32_accuracy():
    y, h, _ = tangent_batch(3, rows=50, n=300, scale=0.5, dtype=torch.float32)
    z = geo.exp_map(y, h)
    assert (geo.row_norm(z) - 1).abs().max() < 1e-6
    t = geo.transport_self(y, h)
    assert (geo.row_dot(t, z).abs() / geo.row_norm(h)).max() < 1e-6


# --- large angles: exact for every θ (issue 12, item 2) -------------------------------------------------

ANGLES = np.concatenate(
    [[0.0, 1e-30, 1e-12, 1e-8, 1e-4, 0.1], np.linspace(0.5, 10 * math.pi, 80), math.pi * np.arange(1, 11)]
)


@pytest.mark.parametrize("n", [3, 64, 2000])
def test_float32_maps_exact_for_angles_up_to_ten_pi(n):
    """float32 exp map / transports against float64 cos/sin evaluations of the same float32 inputs, for
    angles from 0 to 10π (odd multiples of π included, and θ → 0 where sin θ/θ needs care)."""
    gen = torch.Generator().manual_seed(n)
    rows = len(ANGLES)
    y64 = geo.unit(torch.randn(rows, n, generator=gen, dtype=torch.float64))
    u = geo.unit(geo.project(y64, torch.randn(rows, n, generator=gen, dtype=torch.float64)))
    y = y64.float()
    h = (u * torch.from_numpy(ANGLES).unsqueeze(1)).float()
    h1 = geo.project(y64, torch.randn(rows, n, generator=gen, dtype=torch.float64)).float()
    yd, hd, h1d = y.double().numpy(), h.double().numpy(), h1.double().numpy()
    t = np.linalg.norm(hd, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(t > 0, np.sin(t) / t, 1.0)
        c2 = np.where(t > 0, (1 - np.cos(t)) / t**2, 0.5)
    want_exp = yd * np.cos(t) + hd * s
    want_self = hd * np.cos(t) - yd * t * np.sin(t)
    want_tr = h1d - (h1d * hd).sum(1, keepdims=True) * (yd * s + hd * c2)
    z = geo.exp_map(y, h)
    assert np.abs(geo.row_norm(z).double().numpy() - 1).max() <= 1e-6
    assert np.linalg.norm(z.double().numpy() - want_exp, axis=1).max() <= 1e-6
    # transports keep the norm, so their errors are measured relative to it
    got_self = geo.transport_self(y, h).double().numpy()
    assert (np.linalg.norm(got_self - want_self, axis=1) / np.maximum(t[:, 0], 1.0)).max() <= 1e-6
    got_tr = geo.transport(y, h1, h).double().numpy()
    scale = np.linalg.norm(h1d, axis=1)
    assert (np.linalg.norm(got_tr - want_tr, axis=1) / scale).max() <= 1e-6
