"""modman.linalg.blocked: fp64 sums over row blocks equal the whole-matrix fp64 products."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.linalg.blocked import (MIN_BLOCK_ROWS, combine_rows, dot64, gram64, power_of_two_floor, row_blocks,
                                   scaled_norm64)


@st.composite
def operands(draw):
    m = draw(st.integers(1, 5 * MIN_BLOCK_ROWS))  # up to five row blocks
    n = draw(st.integers(1, 12))
    batch = draw(st.sampled_from([(), (3,), (2, 2)]))  # each path of add_gram
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [torch.randn(*batch, m, n, generator=g) for _ in range(2)] + [
        torch.randn(*batch, n, n, generator=g, dtype=torch.float64) for _ in range(2)]


def test_row_blocks_cover_every_row_once():
    for m in (1, 63, 64, 65, 127, 128, 129, 1000, 4096, 32768):
        rows = [i for sl in row_blocks(m) for i in range(sl.start, sl.stop)]
        assert rows == list(range(m))
        assert max(sl.stop - sl.start for sl in row_blocks(m)) <= max(MIN_BLOCK_ROWS, -(-m // 16))


@settings(max_examples=40, deadline=None)
@given(operands())
def test_blocked_products_equal_the_fp64_products(ops):
    X, Y, P, Q = ops
    X64, Y64 = X.double(), Y.double()
    torch.testing.assert_close(gram64(X), X64.mT @ X64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram64(X, Y), X64.mT @ Y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dot64(X, Y), (X64 * Y64).sum((-2, -1)), rtol=1e-12, atol=1e-12)
    out = torch.empty_like(X)
    combine_rows(out, X, P, Y, Q)
    assert torch.equal(out, (X64 @ P + Y64 @ Q).float())  # one rounding of the fp64 result
    c = torch.rand(X.shape[:-2] + (1, 1), dtype=torch.float64)
    combine_rows(X, X, scale=c)  # in place
    assert torch.equal(X, (X64 * c).float())


def test_gram64_broadcasts_batches_like_matmul():
    """X and Y with different batch shapes broadcast as X.mT @ Y does, over several row blocks."""
    g = torch.Generator().manual_seed(0)
    m = 2 * MIN_BLOCK_ROWS + 3
    for sx, sy in [((), (3,)), ((3,), ()), ((1,), (3,)), ((2, 1), (1, 3))]:
        X = torch.randn(*sx, m, 5, generator=g)
        Y = torch.randn(*sy, m, 5, generator=g)
        torch.testing.assert_close(gram64(X, Y), X.double().mT @ Y.double(), rtol=1e-12, atol=1e-12)


def norm64(X: torch.Tensor) -> torch.Tensor:
    amax, ratio = scaled_norm64(X)
    return amax * ratio


def test_scaled_norm64_neither_overflows_nor_underflows():
    """‖X‖_F = max|X|·ratio in fp64 for X of ordinary, huge and denormal scale, batched, with an
    all-zero item (ratio 0 there), and past the fp64 maximum, where only the product overflows."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2 * MIN_BLOCK_ROWS + 5, 7, generator=g, dtype=torch.float64)
    X[1] = 0
    ref = torch.linalg.matrix_norm(X, keepdim=True)
    torch.testing.assert_close(norm64(X), ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(norm64(X.float()), torch.linalg.matrix_norm(X.float().double(), keepdim=True),
                               rtol=1e-14, atol=0)
    for dtype, c in [(torch.float32, 2.0**100), (torch.float32, 2.0**-140), (torch.float64, 2.0**900),
                     (torch.float64, 2.0**-1060)]:
        Y = (X * c).to(dtype)  # powers of two: exact, except for the bits a denormal loses
        expect = torch.linalg.matrix_norm((Y.double() / c), keepdim=True) * c
        torch.testing.assert_close(norm64(Y), expect, rtol=1e-12, atol=0)
        assert torch.isfinite(norm64(Y)).all() and bool((norm64(Y)[[0, 2]] > 0).all())
    amax, ratio = scaled_norm64(torch.full((4, 5), 1e308, dtype=torch.float64))
    assert float(amax) == 1e308 and abs(float(ratio) - 20**0.5) <= 1e-14 * 20**0.5


@given(st.floats(min_value=0.0, allow_infinity=True, width=32) | st.just(math.nan),
       st.sampled_from([torch.float32, torch.float64]))
def test_power_of_two_floor_brackets_and_divides_exactly(x, dtype):
    t = torch.tensor([x], dtype=dtype)
    c = power_of_two_floor(t)
    if not (x > 0 and math.isfinite(x)):
        assert c.item() == 1.0
        return
    mantissa, _ = torch.frexp(c)
    assert mantissa.item() == 0.5  # a power of two
    assert c.item() <= x < 2 * c.item()
    assert ((t / c) * c).item() == x  # exact both ways
