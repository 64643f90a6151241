"""benchmarks/bench_peers.py's equality checks (normkit against the installed PyPI peers, float64, one or two
steps) and benchmarks/op_counts.py's counter. Peers not installed are skipped; timm is in the dev
environment."""

from __future__ import annotations

import pytest
import torch
from benchmarks import bench_peers
from benchmarks.op_counts import count_ops, summary
from torch import nn

from normkit.optim import AdamP


def test_optimizer_rows_that_claim_the_same_update_compute_it():
    rows = [r for r in bench_peers.optimizer_rows() if r[-1]]
    if not rows:
        pytest.skip("no optimizer peer installed (timm, adamp, pytorch-optimizer)")
    for name, only, cand, _package, peer_name, ref, _same in rows:
        diff = bench_peers.optimizer_difference(only, cand, ref)
        assert diff <= bench_peers.SAME_TOL, f"{name} vs {peer_name}: max |Δ| {diff:g}"


def test_the_optimizer_check_sees_a_different_update():
    timm_optim = pytest.importorskip("timm.optim")
    # wd_ratio 0.2 on one side: the projected weights decay differently, and the check must say so.
    diff = bench_peers.optimizer_difference(
        False,
        lambda ps: AdamP(ps, lr=1e-3, weight_decay=0.1, wd_ratio=0.2),
        lambda ps: timm_optim.AdamP(ps, lr=1e-3, weight_decay=0.1),
    )
    assert diff > 1e-6


def test_sgdg_is_geoopt_sphere_exact_without_momentum_and_differs_with_it():
    pytest.importorskip("geoopt")
    assert bench_peers.sgdg_geoopt_difference(0.0, exact=True) <= bench_peers.SAME_TOL
    # Momentum moved by projection (geoopt) vs parallel transport (SGD-G): not the same update.
    assert bench_peers.sgdg_geoopt_difference(0.9, exact=True) > 1e-6


def test_brn_peers_claiming_the_same_output_and_gradients_compute_them():
    pytest.importorskip("torchrl")
    peers = [p for p in bench_peers.brn_peers() if p[2]]
    assert peers
    for name, layer, _same in peers:
        assert bench_peers.brn_difference(layer) <= bench_peers.SAME_TOL, name


def test_op_counter_counts_kernels_not_views_and_a_foreach_op_once():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    counts = count_ops(lambda: (a + b).view(12).t())
    assert counts["aten::add"] == 1 and summary(counts)[0] == 1
    tensors = [torch.randn(5) for _ in range(7)]
    counts = count_ops(lambda: torch._foreach_mul_(tensors, 0.5))
    assert summary(counts)[:2] == (1, 1)
    bn = nn.BatchNorm1d(8).train()
    x = torch.randn(16, 8, requires_grad=True)
    counts = count_ops(lambda: bn(x).sum().backward())
    assert counts["aten::native_batch_norm"] == 1 and counts["aten::native_batch_norm_backward"] == 1
    # .item() is a host synchronisation, counted apart from kernels
    assert summary(count_ops(lambda: a.sum().item()))[2] == 1
