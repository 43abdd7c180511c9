"""The offset ``z_L + alpha (z_S - z_S0)`` computed in the reference's memory: values, gradient, identity at init."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.offset.logits import cached_offset_logits, offset_logits


@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_values_and_gradient(alpha: float) -> None:
    generator = torch.Generator().manual_seed(0)
    z_small = torch.randn(2, 5, 7, generator=generator, requires_grad=True)
    z_large, z_ref = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    expected = z_large + alpha * (z_small.detach() - z_ref)
    weights = torch.randn(2, 5, 7, generator=generator)
    memory = z_ref.data_ptr()
    z = offset_logits(z_small, z_large, z_ref, alpha)
    assert z.data_ptr() == memory, "written into the reference's memory, nothing new allocated"
    torch.testing.assert_close(z, expected)
    (z * weights).sum().backward()
    torch.testing.assert_close(z_small.grad, alpha * weights)


def test_a_view_of_wider_logits_is_not_overwritten() -> None:
    z_small = torch.randn(1, 3, 4, requires_grad=True)
    wide = torch.randn(1, 3, 6)
    before = wide.clone()
    z = offset_logits(z_small, torch.zeros(1, 3, 4), wide[..., :4], 1.0)
    assert torch.equal(wide, before)
    torch.testing.assert_close(z, z_small.detach() - before[..., :4])


def test_exactly_the_large_logits_where_the_pair_agrees() -> None:
    z_large = (torch.randn(2, 3, 50) * 30).bfloat16().float()
    z_small = torch.randn(2, 3, 50) * 30
    for alpha in (1.0, 0.37, 3.0):
        assert torch.equal(offset_logits(z_small, z_large, z_small.clone(), alpha), z_large)


@pytest.mark.parametrize("alpha", [1.0, 1.7])
def test_from_cached_rows_equals_the_offset_of_the_assembled_arrays(alpha: float) -> None:
    """Right-padded, unpadded and left-padded rows; unattended positions count as z_L = z_S0 = 0."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    z_small = torch.randn(3, 5, 6, generator=generator, requires_grad=True)
    rows = [torch.randn(int(m.sum()), 2, 6, generator=generator).half() for m in mask]
    z_large, z_ref = torch.zeros(3, 5, 6), torch.zeros(3, 5, 6)
    for b, (row, m) in enumerate(zip(rows, mask)):
        z_large[b, m.bool()], z_ref[b, m.bool()] = row[:, 0].float(), row[:, 1].float()
    expected = offset_logits(z_small.detach(), z_large, z_ref, alpha)
    weights = torch.randn(3, 5, 6, generator=generator)
    leaf = cached_offset_logits(z_small, rows, mask, alpha)  # a leaf requiring grad: copied, not overwritten
    logits = z_small * 1.0  # as the small model's logits: a temporary of the graph, overwritten
    memory = logits.data_ptr()
    z = cached_offset_logits(logits, rows, mask, alpha)
    assert z.data_ptr() == memory
    for got in (leaf, z):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        z_small.grad = None
        (got * weights).sum().backward()
        torch.testing.assert_close(z_small.grad, alpha * weights)
