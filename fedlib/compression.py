"""Quantised model updates as real byte strings (FedDM-quant, ``../shared/papers.md`` section 2).

A client sends ``delta = w_k - w_global`` quantised to ``b`` bits by a uniform affine grid::

    lo = min(delta), hi = max(delta)          (per tensor; per output channel with scheme="channel")
    scale = (hi - lo) / (2**b - 1)
    q = round((delta - lo) / scale)           (round-to-nearest, or stochastic: floor(v + u), u ~ U[0, 1))
    delta_hat = lo + scale * q                (the server's dequantisation)

Our choice of zero point: the float32 offset ``lo`` (the grid spans exactly [lo, hi]), not an integer
code, so no value is clipped and the round-to-nearest error is at most ``scale / 2`` (stochastic
rounding: below ``scale``, unbiased). The codes travel bit-packed (two 4-bit codes per byte, low nibble
first; 8-bit codes one per byte; 16-bit codes little-endian), followed by the float32 scale(s) and zero
point(s). ``b = 32`` is the lossless passthrough: the raw float32 bytes and no scale.

Bytes counted are ``len(encode(q))``: the packed codes plus 4 bytes per scale and per zero point. The
tensor shapes and names are not sent: both sides hold the same architecture. ::

    q = quantize_params(update, bits=8)              # {name: QuantizedTensor}
    blob = encode(q); n_bytes = len(blob)            # == payload_bytes(q)
    update_hat = dequantize_params(decode(blob, q))  # server side, from the bytes alone (+ shapes)

For K clients at once (stacked Params ``{name: [K, ...]}``) use :func:`compress_stacked`, which
quantises every client's update, counts its payload and returns what the server reconstructs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .utils import check_choice

Params = dict[str, Tensor]
BITS = (32, 16, 8, 4, 2)
SCHEMES = ("tensor", "channel")
ROUNDINGS = ("nearest", "stochastic")
_F32_MAX = float(torch.finfo(torch.float32).max)
_CODE_DTYPE = {16: np.dtype("<u2"), 8: np.dtype("u1"), 4: np.dtype("u1"), 2: np.dtype("u1")}


# ----------------------------------------------------------------------------------------------
# bit packing
PACK_BITS = (1, 2, 4, 8, 16)


def _check_codes(codes: np.ndarray, bits: int) -> None:
    """Every code an integer in 0..2**bits - 1: numpy's casts would otherwise wrap a negative or too
    wide code into another valid-looking one (300 -> 44 at 8 bits) or spill into its neighbours."""
    if not codes.size:
        return
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes have dtype {codes.dtype}; allowed: integers 0..{2**bits - 1}. Round and cast "
                         "them first, e.g. np.rint(v).astype(np.int64)")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= 2**bits:
        raise ValueError(f"a code {lo if lo < 0 else hi} does not fit in {bits} bits; allowed: integers "
                         f"0..{2**bits - 1}. Clamp the codes or pack with more bits")


def pack_bits(codes: np.ndarray, bits: int, _checked: bool = False) -> bytes:
    """Unsigned integer codes (each < 2**bits) -> packed bytes. 1/2/4 bits: several codes per byte,
    the first code in the lowest bits; 8 bits: one byte each; 16 bits: little-endian pairs."""
    check_choice("bits to pack", bits, PACK_BITS)
    codes = np.asarray(codes).ravel()
    if not _checked:  # quantize_tensor's codes are clamped to the range already
        _check_codes(codes, bits)
    if bits in (8, 16):
        return codes.astype(_CODE_DTYPE[bits]).tobytes()
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    padded = padded.reshape(-1, per_byte)
    out = np.zeros(padded.shape[0], dtype=np.uint8)
    for j in range(per_byte):
        out |= padded[:, j] << np.uint8(j * bits)
    return out.tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``n`` codes, as int64."""
    check_choice("bits to unpack", bits, PACK_BITS)
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"n={n!r} codes to unpack; allowed: an integer >= 0")
    if len(data) < packed_size(n, bits):
        raise ValueError(f"unpack_bits needs {packed_size(n, bits)} bytes for n={n} codes of {bits} bits but got "
                         f"{len(data)}; the data are truncated, or n and bits differ from what was packed")
    if bits in (8, 16):
        return np.frombuffer(data, dtype=_CODE_DTYPE[bits], count=n).astype(np.int64)
    per_byte = 8 // bits
    raw = np.frombuffer(data, dtype=np.uint8)
    codes = np.stack([(raw >> np.uint8(j * bits)) & np.uint8(2**bits - 1) for j in range(per_byte)], axis=1)
    return codes.ravel()[:n].astype(np.int64)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy once packed."""
    return -(-n * bits // 8) if bits < 8 else n * bits // 8


# ----------------------------------------------------------------------------------------------
# one tensor
@dataclass
class QuantizedTensor:
    """What travels for one tensor: ``payload`` (packed codes, or raw float32 for 32 bits) and the
    float32 ``scale`` / ``zero_point`` (one each per tensor, or per output channel). ``shape`` and
    ``dtype`` are known to the receiver (same architecture) and not counted."""

    payload: bytes
    scale: Tensor  # float32 [G]: G = 1 (per tensor) or shape[0] (per channel); empty for 32 bits
    zero_point: Tensor  # float32 [G]
    shape: tuple
    bits: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def nbytes(self) -> int:
        return len(self.payload) + 4 * self.scale.numel() + 4 * self.zero_point.numel()

    @property
    def payload_size(self) -> int:
        """Bytes the payload must have for this shape and bit width (what ``decode`` reads)."""
        return 4 * self.numel if self.bits == 32 else packed_size(self.numel, self.bits)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_bytes(self) -> bytes:
        return (self.payload + self.scale.numpy().astype("<f4").tobytes()
                + self.zero_point.numpy().astype("<f4").tobytes())


def _groups(shape: tuple, scheme: str) -> int:
    return shape[0] if scheme == "channel" and len(shape) >= 2 else 1


def quantize_tensor(x: Tensor, bits: int = 8, scheme: str = "tensor", rounding: str = "nearest",
                    generator: torch.Generator | None = None) -> QuantizedTensor:
    """Uniform affine quantisation of ``x`` to ``bits`` bits (see the module docstring).

    ``scheme="channel"``: one scale and zero point per slice along dim 0 (output channels) for tensors
    of 2 or more dims; 1-D tensors (biases, norm scales) keep one per tensor. ``rounding="stochastic"``
    draws its uniforms from ``generator`` (on CPU)."""
    check_choice("bits", bits, BITS, fix="FedDM-quant uses 16, 8 or 4 bits; 32 sends float32 unchanged.")
    check_choice("scheme", scheme, SCHEMES)
    check_choice("rounding", rounding, ROUNDINGS)
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    x = x.detach().cpu()
    # checked before the cast to float32, which turns a finite float64 1e300 into inf; one reduction
    # decides both checks (NaN and inf make the largest magnitude non-finite)
    amax = x.abs().max().item() if x.numel() else 0.0
    if not math.isfinite(amax):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"cannot quantise a tensor holding NaN or inf ({bad} of {x.numel()} values); allowed: "
                         "finite values. Check the local training for divergence")
    if amax > _F32_MAX:
        raise ValueError(f"cannot quantise a tensor with max |x| = {x.abs().max().item():.3g}: out of float32's "
                         f"range; allowed: |x| <= {_F32_MAX:.3g}. Check the local training for divergence")
    x = x.to(torch.float32)
    empty = torch.zeros(0)
    if bits == 32 or not x.numel():
        # an empty tensor has no range to describe: no codes, no scale, zero bytes (as at 32 bits)
        return QuantizedTensor(x.numpy().astype("<f4").tobytes(), empty, empty, shape, bits, dtype, device)
    g = _groups(shape, scheme)
    flat = x.reshape(g, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    # hi - lo in float32 overflows to inf for values near +-3.4e38 (the codes then came out as garbage);
    # half of float32's range keeps the receiver's lo + scale * q finite too
    span = (hi.double() - lo.double()).max().item()
    if span > _F32_MAX / 2:
        raise ValueError(f"cannot quantise a tensor whose range max - min = {span:.3g} (max |x| = "
                         f"{flat.abs().max().item():.3g}) overflows float32's scale and zero point; allowed: "
                         f"max - min <= {_F32_MAX / 2:.3g}. Check the local training for divergence")
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    v = (flat - lo[:, None]) / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    if rounding == "nearest":
        q = torch.round(v)
    else:
        q = torch.floor(v + torch.rand(v.shape, generator=generator))
    q = q.clamp_(0, levels).to(torch.int64)
    return QuantizedTensor(pack_bits(q.numpy(), bits, _checked=True), scale, lo, shape, bits, dtype, device)


def dequantize_tensor(q: QuantizedTensor) -> Tensor:
    check_choice("bits", q.bits, BITS)
    g = q.scale.numel()
    groups_ok = g == 0 if q.bits == 32 or q.numel == 0 else (g >= 1 and q.numel % g == 0)
    if len(q.payload) != q.payload_size or q.zero_point.numel() != g or not groups_ok:
        raise ValueError(f"QuantizedTensor of shape {q.shape} at {q.bits} bits needs a {q.payload_size}-byte payload "
                         f"and equal numbers of scales and zero points (1, or one per row; none at 32 bits), got "
                         f"{len(q.payload)} bytes, {g} scales, {q.zero_point.numel()} zero points. Rebuild it with "
                         "quantize_tensor or decode")
    if q.bits == 32 or q.numel == 0:
        x = torch.from_numpy(np.frombuffer(q.payload, dtype="<f4").copy())
    else:
        codes = torch.from_numpy(unpack_bits(q.payload, q.bits, q.numel)).reshape(g, -1)
        x = q.zero_point[:, None] + q.scale[:, None] * codes.to(torch.float32)
    return x.reshape(q.shape).to(q.device, q.dtype)


# ----------------------------------------------------------------------------------------------
# a whole update (dict of tensors), and its byte string
def quantize_params(params: Params, bits: int = 8, scheme: str = "tensor", rounding: str = "nearest",
                    generator: torch.Generator | None = None) -> dict[str, QuantizedTensor]:
    return {n: quantize_tensor(p, bits, scheme, rounding, generator) for n, p in params.items()}


def layout(params: Params, bits: int = 8, scheme: str = "tensor") -> dict[str, QuantizedTensor]:
    """What a receiver knows before any byte arrives (names, shapes, bits, groups) as empty
    QuantizedTensors: the ``like`` of :func:`decode`, without quantising anything."""
    check_choice("bits", bits, BITS)
    check_choice("scheme", scheme, SCHEMES)
    out = {}
    for n, p in params.items():
        shape = tuple(p.shape)
        g = 0 if bits == 32 or not p.numel() else _groups(shape, scheme)
        out[n] = QuantizedTensor(b"", torch.zeros(g), torch.zeros(g), shape, bits, p.dtype)
    return out


def layout_bytes(like: dict[str, QuantizedTensor]) -> int:
    """Bytes a payload of this layout has (what :func:`decode` reads)."""
    return sum(t.payload_size + 8 * t.scale.numel() for t in like.values())


def dequantize_params(q: dict[str, QuantizedTensor]) -> Params:
    return {n: dequantize_tensor(t) for n, t in q.items()}


def payload_bytes(q: dict[str, QuantizedTensor]) -> int:
    """Bytes on the wire for one quantised update: ``len(encode(q))``."""
    return sum(t.nbytes for t in q.values())


def encode(q: dict[str, QuantizedTensor]) -> bytes:
    """One byte string: per tensor (in dict order) its packed codes, scales, zero points."""
    return b"".join(t.to_bytes() for t in q.values())


def decode(blob: bytes, like: dict[str, QuantizedTensor]) -> dict[str, QuantizedTensor]:
    """Rebuild the quantised tensors from ``blob`` alone; ``like`` supplies only what the receiver
    already knows (names, shapes, bits, groups), never values. A ``blob`` shorter or longer than that
    layout is refused, naming the tensor where the bytes run out."""
    _check_layout(blob, like)
    out, pos = {}, 0
    for name, t in like.items():
        n_payload = t.payload_size
        g = t.scale.numel()
        payload = blob[pos: pos + n_payload]
        pos += n_payload
        scale = torch.from_numpy(np.frombuffer(blob, dtype="<f4", count=g, offset=pos).copy())
        pos += 4 * g
        zero = torch.from_numpy(np.frombuffer(blob, dtype="<f4", count=g, offset=pos).copy())
        pos += 4 * g
        out[name] = QuantizedTensor(payload, scale, zero, t.shape, t.bits, t.dtype, t.device)
    return out


def _check_layout(blob: bytes, like: dict[str, QuantizedTensor]) -> None:
    """Before reading anything: the byte count of ``blob`` against the layout of ``like``."""
    end, total = {}, 0
    for name, t in like.items():
        total += t.payload_size + 8 * t.scale.numel()
        end[name] = total
    if total == len(blob):
        return
    fix = "Decode with the sender's shapes, bits and scheme, and check the transfer for truncation."
    if len(blob) < total:
        name = next(n for n, e in end.items() if e > len(blob))
        t = like[name]
        start = end[name] - t.payload_size - 8 * t.scale.numel()
        raise ValueError(f"byte string has {len(blob)} bytes but the layout of {len(like)} tensors needs {total}: "
                         f"the bytes run out in tensor {name!r} (shape {t.shape}, {t.bits} bits), which needs bytes "
                         f"{start}..{end[name]} and got {max(0, len(blob) - start)} of its {end[name] - start}. {fix}")
    last = f"the last tensor {list(like)[-1]!r}" if like else "the layout (it holds no tensors)"
    raise ValueError(f"byte string has {len(blob)} bytes but the layout of {len(like)} tensors needs {total}: "
                     f"{len(blob) - total} bytes are left over after {last}. {fix}")


def float32_bytes(params: Params) -> int:
    """The uncompressed size: 4 bytes per parameter."""
    return 4 * sum(p.numel() for p in params.values())


# ----------------------------------------------------------------------------------------------
# the federated step: K clients' updates at once
@dataclass(frozen=True)
class Quantizer:
    """How updates are compressed on one link (uplink or downlink)."""

    bits: int = 8
    scheme: str = "tensor"
    rounding: str = "nearest"

    def __post_init__(self):
        check_choice("bits", self.bits, BITS, fix="FedDM-quant uses 16, 8 or 4 bits; 32 sends float32 unchanged.")
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("rounding", self.rounding, ROUNDINGS)

    def roundtrip(self, update: Params, generator: torch.Generator | None = None) -> tuple[Params, int]:
        """Quantise, encode to bytes, decode, dequantise: (what the receiver holds, bytes sent)."""
        q = quantize_params(update, self.bits, self.scheme, self.rounding, generator)
        blob = encode(q)
        return dequantize_params(decode(blob, q)), len(blob)


def compress_stacked(updates: Params, quantizer: Quantizer,
                     generator: torch.Generator | None = None) -> tuple[Params, list[int]]:
    """Each of K stacked updates ``{name: [K, ...]}`` through ``quantizer``: (the dequantised updates,
    stacked as given, and the bytes each client sent)."""
    k = next(iter(updates.values())).shape[0]
    received, sizes = [], []
    for i in range(k):
        hat, n_bytes = quantizer.roundtrip({n: u[i] for n, u in updates.items()}, generator)
        received.append(hat)
        sizes.append(n_bytes)
    return {n: torch.stack([r[n] for r in received]) for n in updates}, sizes
