"""Tests of methods/affine.py: float16 scales/offsets, codes, and reconstruction."""

from __future__ import annotations

import pytest
import torch

from methods import affine

ALL_BITS = list(range(1, 9))
MODES = [True, False]
MODE_IDS = ["sym", "asym"]

# float16 rounds to nearest with 11 significant bits: |x - fp16(x)| <= |x| * 2**-11.
FP16_REL = 2.0**-11


def gaussian_groups(rows: int, n_groups: int, group: int, seed: int) -> torch.Tensor:
    """Gaussian weights whose rows have very different magnitudes (and a shifted mean)."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.empty(rows, 1, 1).uniform_(-2, 1, generator=generator)
    shift = torch.randn(rows, 1, 1, generator=generator) * magnitude * 0.5
    return torch.randn(rows, n_groups, group, generator=generator) * magnitude + shift


def round_trip(
    groups: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    scale, offset = affine.fit_scales(groups, bits, symmetric)
    codes = affine.encode(groups, scale, offset, bits)
    decoded = affine.decode(codes, scale, offset, bits)
    return codes, scale, offset, decoded


def error_bound(bits: int, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Half a step, plus what rounding the scale (and offset) to float16 can add at the ends
    of the range: the scale's error times the number of steps, and the offset's error."""
    s = scale.float().unsqueeze(-1)
    bound = s / 2 + affine.levels(bits) * s * FP16_REL
    if offset is not None:
        bound = bound + offset.float().abs().unsqueeze(-1) * FP16_REL
    return bound * (1 + 1e-5)  # float32 arithmetic in encode/decode


@pytest.mark.parametrize("symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    groups = gaussian_groups(24, 3, 32, seed=bits)
    _, scale, offset, decoded = round_trip(groups, bits, symmetric)
    err = (decoded - groups).abs()
    assert torch.all(err <= error_bound(bits, scale, offset))


@pytest.mark.parametrize("symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_scales_and_offsets_are_positive_float16(bits: int, symmetric: bool) -> None:
    groups = gaussian_groups(8, 4, 16, seed=10 + bits)
    groups[0] = 0.0  # an all-zero row still gets a positive scale
    scale, offset = affine.fit_scales(groups, bits, symmetric)
    assert scale.dtype == torch.float16
    assert scale.shape == groups.shape[:2]
    assert torch.all(scale > 0)
    assert torch.all(torch.isfinite(scale))
    if symmetric:
        assert offset is None
    else:
        assert offset is not None
        assert offset.dtype == torch.float16
        assert offset.shape == groups.shape[:2]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fitted_scales_follow_the_documented_formulas(bits: int) -> None:
    groups = gaussian_groups(8, 2, 32, seed=20 + bits)
    sym_scale, _ = affine.fit_scales(groups, bits, symmetric=True)
    absmax = groups.abs().amax(dim=-1)
    expected = absmax / (2 ** (bits - 1) - 0.5)
    torch.testing.assert_close(sym_scale.float(), expected, rtol=FP16_REL, atol=0)

    asym_scale, offset = affine.fit_scales(groups, bits, symmetric=False)
    low = groups.amin(dim=-1).clamp(max=0.0)  # the range is widened to include 0
    high = groups.amax(dim=-1).clamp(min=0.0)
    torch.testing.assert_close(
        asym_scale.float(), (high - low) / (2**bits - 1), rtol=FP16_REL, atol=0
    )
    assert offset is not None
    zero = torch.round(-low / asym_scale.float())  # a whole zero point
    torch.testing.assert_close(offset.float(), -zero * asym_scale.float(), rtol=FP16_REL, atol=0)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_zero_is_stored_exactly_enough_and_an_outlier_adds_no_bias(bits: int) -> None:
    """A row with one outlier: its many small weights must not all land on one side."""
    torch.manual_seed(bits)
    row = torch.randn(1, 1, 256) * 0.05
    row[0, 0, 0] = 8.0
    scale, offset = affine.fit_scales(row, bits, symmetric=False)
    assert offset is not None
    decoded = affine.decode(affine.encode(row, scale, offset, bits), scale, offset, bits)
    zero_code = affine.encode(torch.zeros(1, 1, 1), scale, offset, bits)
    zero = affine.decode(zero_code, scale, offset, bits)
    assert abs(float(zero)) <= 2**-10 * float(scale.float().max()) * 2**bits
    small = decoded[0, 0, 1:] - row[0, 0, 1:]
    assert abs(float(small.mean())) <= 0.25 * float(scale.float()) + 1e-6


@pytest.mark.parametrize("symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_codes_are_in_range(bits: int, symmetric: bool) -> None:
    groups = gaussian_groups(8, 2, 32, seed=30 + bits)
    codes, *_ = round_trip(groups, bits, symmetric)
    assert codes.dtype == torch.uint8
    assert codes.shape == groups.shape
    assert int(codes.max()) < affine.levels(bits)
    # The codes use the range: the extremes of a row land on (or next to) the end codes.
    assert int(codes.max()) >= affine.levels(bits) - 2


@pytest.mark.parametrize("symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_representable_weights_keep_their_codes(bits: int, symmetric: bool) -> None:
    """Decoding then encoding again with the same scales gives back the same codes."""
    groups = gaussian_groups(8, 2, 32, seed=40 + bits)
    codes, scale, offset, _ = round_trip(groups, bits, symmetric)
    generator = torch.Generator().manual_seed(bits)
    other = torch.randint(0, affine.levels(bits), codes.shape, generator=generator)
    other = other.to(torch.uint8)
    for some_codes in (codes, other):
        weights = affine.decode(some_codes, scale, offset, bits)
        assert torch.equal(affine.encode(weights, scale, offset, bits), some_codes)


@pytest.mark.parametrize("symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_all_zero_rows_decode_to_exact_zeros(bits: int, symmetric: bool) -> None:
    groups = gaussian_groups(6, 3, 16, seed=50 + bits)
    groups[2] = 0.0
    groups[4, 1] = 0.0  # a single zero group in an otherwise non-zero row
    _, _, _, decoded = round_trip(groups, bits, symmetric)
    assert torch.all(decoded[2] == 0)
    assert torch.all(decoded[4, 1] == 0)


@pytest.mark.parametrize("symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("value", [3.0, -2.5, 1e-3, -1e-9, 1e-30, 500.0])
def test_constant_rows_stay_finite(bits: int, symmetric: bool, value: float) -> None:
    groups = torch.full((2, 2, 32), value)
    codes, scale, offset, decoded = round_trip(groups, bits, symmetric)
    assert torch.all(torch.isfinite(scale))
    assert torch.all(torch.isfinite(decoded))
    # All the weights of a constant group get one code and decode to one value.
    assert torch.all(codes == codes[..., :1])
    err = (decoded - groups).abs()
    # A tiny constant may fall below float16's smallest scale: then it decodes to zero.
    assert torch.all(err <= torch.maximum(error_bound(bits, scale, offset), torch.tensor(1e-7)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_decode_returns_the_requested_dtype(dtype: torch.dtype) -> None:
    groups = gaussian_groups(4, 2, 8, seed=60)
    bits = 4
    for symmetric in MODES:
        codes, scale, offset, reference = round_trip(groups, bits, symmetric)
        decoded = affine.decode(codes, scale, offset, bits, dtype)
        assert decoded.dtype == dtype
        # Each of the (at most three) roundings in ``dtype`` errs by at most eps/2 of the
        # largest magnitude involved: a code times the scale, and the offset.
        magnitude = affine.levels(bits) * scale.float().unsqueeze(-1)
        if offset is not None:
            magnitude = magnitude + offset.float().abs().unsqueeze(-1)
        bound = 2 * torch.finfo(dtype).eps * magnitude
        assert torch.all((decoded.float() - reference).abs() <= bound)


def test_group_view_splits_rows_into_groups() -> None:
    weight = torch.arange(24.0).reshape(2, 12)
    view = affine.group_view(weight, 4)
    assert view.shape == (2, 3, 4)
    assert torch.equal(view[1, 2], weight[1, 8:12])
