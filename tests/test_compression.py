"""Properties of fedlib.compression: packing is exact, error is bounded by the step size, bytes
counted are the bytes sent, 32 bits is lossless, stochastic rounding is unbiased."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib import compression as C


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8, 16]), n=st.integers(0, 257), seed=st.integers(0, 2**31))
def test_bit_packing_is_exact_and_sized(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=n)
    data = C.pack_bits(codes, bits)
    assert len(data) == C.packed_size(n, bits) == -(-n * bits // 8)
    np.testing.assert_array_equal(C.unpack_bits(data, bits, n), codes)


def test_four_bit_layout_low_nibble_first():
    assert C.pack_bits(np.array([1, 2, 15]), 4) == bytes([0x21, 0x0F])


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError, match="does not fit"):
        C.pack_bits(np.array([16]), 4)


shapes = st.sampled_from([(7,), (3, 5), (4, 3, 3, 3), (1,), (2, 1, 1, 1)])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([16, 8, 4, 2]), scheme=st.sampled_from(C.SCHEMES),
       rounding=st.sampled_from(C.ROUNDINGS), seed=st.integers(0, 2**31), log_scale=st.floats(-8, 3))
def test_roundtrip_error_bounded_by_step(shape, bits, scheme, rounding, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10**log_scale
    q = C.quantize_tensor(x, bits, scheme, rounding, generator=g)
    x_hat = C.dequantize_tensor(q)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    groups = q.scale.numel()
    step = q.scale.reshape(groups, *([1] * 1))
    err = (x_hat - x).abs().reshape(groups, -1)
    bound = (0.5 if rounding == "nearest" else 1.0) * step
    # float32 arithmetic on lo + scale * q: allow a few ulps of the tensor's magnitude
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().max()
    assert (err <= bound + slack).all()
    assert q.nbytes == len(q.to_bytes()) == C.packed_size(x.numel(), bits) + 8 * groups


def test_per_channel_has_one_scale_per_output_channel_and_tighter_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 3, 3, generator=g) * torch.logspace(-3, 0, 8)[:, None, None, None]
    qt, qc = C.quantize_tensor(x, 4, "tensor"), C.quantize_tensor(x, 4, "channel")
    assert qt.scale.shape == (1,) and qc.scale.shape == (8,)
    assert C.quantize_tensor(torch.randn(8), 4, "channel").scale.shape == (1,)  # 1-D: per tensor
    assert (C.dequantize_tensor(qc) - x).abs().max() < (C.dequantize_tensor(qt) - x).abs().max()


@pytest.mark.parametrize("scheme", C.SCHEMES)
def test_32_bits_is_lossless_passthrough(scheme):
    x = torch.randn(5, 3, 2, dtype=torch.float32) * 1e30
    q = C.quantize_tensor(x, 32, scheme)
    assert torch.equal(C.dequantize_tensor(q), x)
    assert q.nbytes == 4 * x.numel() and q.scale.numel() == 0


def test_constant_tensor_is_exact():
    x = torch.full((3, 4), 0.25)
    for bits in (16, 8, 4):
        assert torch.equal(C.dequantize_tensor(C.quantize_tensor(x, bits)), x)


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([0.0, 1.0, 0.3])  # 2 bits: grid step 1/3, and 0.3 lies off the grid
    draws = torch.stack([C.dequantize_tensor(C.quantize_tensor(x, 2, rounding="stochastic", generator=g))
                         for _ in range(4000)])
    assert abs(draws[:, 2].mean().item() - 0.3) < 0.01
    nearest = C.dequantize_tensor(C.quantize_tensor(x, 2))
    assert abs(nearest[2].item() - 1 / 3) < 1e-6  # round-to-nearest is biased here


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_bytes_counted_equal_the_encoded_payload_and_decode_from_bytes_alone(bits):
    g = torch.Generator().manual_seed(2)
    params = {"conv.weight": torch.randn(6, 3, 3, 3, generator=g), "conv.bias": torch.randn(6, generator=g),
              "odd": torch.randn(7, generator=g)}
    q = C.quantize_params(params, bits, "channel")
    blob = C.encode(q)
    assert len(blob) == C.payload_bytes(q)
    expected = sum(4 * p.numel() if bits == 32 else C.packed_size(p.numel(), bits) + 8 * q[n].scale.numel()
                   for n, p in params.items())
    assert len(blob) == expected
    back = C.dequantize_params(C.decode(blob, q))
    direct = C.dequantize_params(q)
    for n in params:
        assert torch.equal(back[n], direct[n])
    with pytest.raises(ValueError, match="layout"):
        C.decode(blob + b"\0", q)


def test_eight_bit_update_is_about_four_times_smaller():
    params = {"w": torch.randn(64, 64, 3, 3), "b": torch.randn(64)}
    _, n_bytes = C.Quantizer(8).roundtrip(params)
    ratio = C.float32_bytes(params) / n_bytes
    assert 3.9 <= ratio < 4.0
    _, n4 = C.Quantizer(4).roundtrip(params)
    assert 7.8 <= C.float32_bytes(params) / n4 < 8.0


def test_compress_stacked_matches_per_client_roundtrip():
    g = torch.Generator().manual_seed(3)
    stacked = {"w": torch.randn(3, 4, 5, generator=g), "b": torch.randn(3, 4, generator=g)}
    hat, sizes = C.compress_stacked(stacked, C.Quantizer(4, "channel"))
    assert hat["w"].shape == (3, 4, 5) and len(sizes) == 3
    for k in range(3):
        ref, n = C.Quantizer(4, "channel").roundtrip({"w": stacked["w"][k], "b": stacked["b"][k]})
        assert sizes[k] == n and torch.equal(hat["w"][k], ref["w"])


def test_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: 32, 16, 8, 4"):
        C.quantize_tensor(torch.zeros(3), bits=3)
    with pytest.raises(ValueError, match="NaN"):
        C.quantize_tensor(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="'nearest', 'stochastic'"):
        C.Quantizer(8, rounding="floor")


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8, 16]), n=st.integers(1, 100), cut=st.integers(1, 200), seed=st.integers(0, 99))
def test_unpack_refuses_data_too_short_for_n_codes(bits, n, cut, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=n)
    data = C.pack_bits(codes, bits)
    short = data[: max(0, len(data) - cut)]
    with pytest.raises(ValueError) as info:
        C.unpack_bits(short, bits, n)
    assert (f"needs {C.packed_size(n, bits)} bytes for n={n} codes of {bits} bits but got {len(short)}"
            in str(info.value))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("bad", ["negative", "too_wide"])
def test_pack_refuses_codes_that_would_wrap(bits, bad):
    code = -1 if bad == "negative" else 2**bits  # 8 bits used to store 256 as 0, -1 as 255
    with pytest.raises(ValueError) as info:
        C.pack_bits(np.array([0, code, 1]), bits)
    assert f"a code {code} does not fit in {bits} bits; allowed: integers 0..{2**bits - 1}" in str(info.value)
    with pytest.raises(ValueError, match=rf"dtype float64; allowed: integers 0..{2**bits - 1}"):
        C.pack_bits(np.array([0.0, 1.5]), bits)


def _layout(bits):
    g = torch.Generator().manual_seed(5)
    params = {"conv.weight": torch.randn(6, 3, 3, 3, generator=g), "conv.bias": torch.randn(6, generator=g),
              "odd": torch.randn(7, generator=g)}
    q = C.quantize_params(params, bits, "channel")
    ends, total = {}, 0
    for n, t in q.items():
        total += len(t.to_bytes())
        ends[n] = total
    return q, C.encode(q), ends


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([32, 16, 8, 4, 2]), data=st.data())
def test_decode_of_a_truncated_byte_string_names_the_tensor_where_the_bytes_ran_out(bits, data):
    q, blob, ends = _layout(bits)
    keep = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ValueError) as info:
        C.decode(blob[:keep], q)
    where = next(n for n, e in ends.items() if e > keep)
    msg = str(info.value)
    assert f"has {keep} bytes but the layout of 3 tensors needs {len(blob)}" in msg
    assert f"run out in tensor {where!r}" in msg


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_decode_of_a_too_long_byte_string_says_how_much_is_left_over(bits):
    q, blob, _ = _layout(bits)
    with pytest.raises(ValueError, match=rf"has {len(blob) + 3} bytes but .* needs {len(blob)}: 3 bytes are left "
                                         r"over after the last tensor 'odd'"):
        C.decode(blob + b"abc", q)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_dequantize_refuses_a_payload_that_does_not_match_its_shape(bits):
    q = C.quantize_tensor(torch.randn(4, 5), bits, "channel")
    q.payload = q.payload[:-1]
    with pytest.raises(ValueError) as info:
        C.dequantize_tensor(q)
    assert f"shape (4, 5) at {bits} bits needs a {q.payload_size}-byte payload" in str(info.value)
    assert f"got {q.payload_size - 1} bytes" in str(info.value)


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("scheme", ["tensor", "channel"])
def test_a_range_that_overflows_float32_is_named_not_the_codes(bits, scheme):
    # hi - lo = 6e38 overflowed to inf in float32 and the error blamed the codes ("does not fit")
    x = torch.tensor([[3e38, -3e38, 0.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError) as info:
        C.quantize_tensor(x, bits, scheme)
    msg = str(info.value)
    assert "range max - min = 6e+38 (max |x| = 3e+38) overflows float32" in msg and "allowed: max - min <=" in msg
    assert "code" not in msg
    C.quantize_tensor(x / 1e4, bits, scheme)  # the same shape at a representable scale passes


@pytest.mark.parametrize("value", [1e300, -1e39])
def test_a_finite_float64_beyond_float32_is_out_of_range_not_nan(value):
    x = torch.tensor([0.5, value], dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        C.quantize_tensor(x, 8)
    msg = str(info.value)
    assert f"max |x| = {abs(value):.3g}: out of float32's range" in msg and "NaN" not in msg


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("shape, scheme", [((0,), "tensor"), ((0, 3), "channel"), ((3, 0), "channel"),
                                           ((2, 0, 4), "tensor")])
def test_an_empty_tensor_travels_as_zero_bytes_and_comes_back_empty(bits, shape, scheme):
    update = {"w": torch.randn(2, 3), "e": torch.zeros(shape)}
    q = C.quantize_params(update, bits, scheme)
    assert q["e"].nbytes == 0 and len(C.encode({"e": q["e"]})) == 0
    hat = C.dequantize_params(C.decode(C.encode(q), q))
    assert hat["e"].shape == shape and hat["e"].dtype == torch.float32
    assert torch.equal(hat["w"], C.dequantize_tensor(C.quantize_tensor(update["w"], bits, scheme)))
