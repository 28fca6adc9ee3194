"""Bech32 (BIP-173) encoding, as used by age keys (``age1…``, ``AGE-SECRET-KEY-1…``).

age uses plain Bech32 (not Bech32m) without BIP-173's 90-character limit. Strings are either all
lower case or all upper case; the checksum covers the human-readable part (HRP) and the data.

>>> s = encode("age", bytes(32))
>>> decode(s) == ("age", bytes(32))
True
"""

from __future__ import annotations

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_REV = {c: i for i, c in enumerate(CHARSET)}
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


class Bech32Error(ValueError):
    """A string is not valid Bech32 (bad characters, mixed case, checksum…)."""


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GEN[i]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: bytes | list[int], from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    out: list[int] = []
    maxv = (1 << to_bits) - 1
    for value in data:
        if value < 0 or value >> from_bits:
            raise Bech32Error("invalid data value")
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & maxv)
    elif bits >= from_bits or ((acc << (to_bits - bits)) & maxv):
        raise Bech32Error("invalid padding")
    return out


def encode(hrp: str, data: bytes) -> str:
    """Encode ``data`` under the human-readable part ``hrp`` (returned in lower case)."""
    hrp = hrp.lower()
    if not hrp or any(ord(c) < 33 or ord(c) > 126 for c in hrp):
        raise Bech32Error("invalid human-readable part")
    values = _convert_bits(data, 8, 5, True)
    poly = _polymod(_hrp_expand(hrp) + values + [0] * 6) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[v] for v in values + checksum)


def decode(text: str) -> tuple[str, bytes]:
    """Decode a Bech32 string into ``(hrp, data)``; the HRP is returned in lower case."""
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise Bech32Error("invalid character")
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("mixed case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise Bech32Error("separator misplaced or data too short")
    hrp, rest = text[:pos], text[pos + 1 :]
    try:
        values = [_REV[c] for c in rest]
    except KeyError:
        raise Bech32Error("invalid data character") from None
    if _polymod(_hrp_expand(hrp) + values) != 1:
        raise Bech32Error("invalid checksum")
    return hrp, bytes(_convert_bits(values[:-6], 5, 8, False))
