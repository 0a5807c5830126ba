"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, without dropout recovery): the server learns the
sum of the sites' weighted updates and nothing about any single one.

Every pair of sites shares a secret (X25519 key agreement over keys provisioned with the sites' kits; the server's
kit has none). Each round a site quantises ``weight x (its weights - the global weights)`` to fixed point in
Z/2^64, adds a mask stream per peer (+ for peers after it, - for peers before it; expanded from the pair's secret,
the round and the tensor name) and sends the result: uniformly random 64-bit integers to anyone without the
secrets. In the server's sum every mask meets its negative and cancels exactly, leaving the sum of the quantised
updates. The price: every site must answer every round (a missing site's masks do not cancel, and the round keeps
the global model), and the server cannot check a single update's values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRACTION_BITS = 32  # fixed point: 2^-32 resolution; |weight x update| must stay below 2^31 (checked)
_LIMIT = 2.0 ** (63 - FRACTION_BITS)


class SecureAggregationError(ValueError):
    """Missing or inconsistent keys, a site missing from a round, or a value too large for the fixed point."""


@dataclass(frozen=True)
class SiteKeys:
    """One site's private key and every federation member's public key (hex, X25519)."""

    site: str
    private_key: str
    public_keys: dict[str, str]

    @property
    def sites(self) -> list[str]:
        return sorted(self.public_keys)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"site": self.site, "private_key": self.private_key,
                                    "public_keys": self.public_keys}, indent=1))
        path.chmod(0o600)

    @classmethod
    def read(cls, path: Path) -> SiteKeys:
        try:
            raw = json.loads(Path(path).read_text())
            keys = cls(raw["site"], raw["private_key"], dict(raw["public_keys"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecureAggregationError(f"cannot read the secure-aggregation keys {path}: {exc}") from exc
        if keys.site not in keys.public_keys:
            raise SecureAggregationError(f"{path}: site {keys.site!r} is not among the federation's public keys")
        return keys


def provision_keys(sites: list[str]) -> dict[str, SiteKeys]:
    """Fresh X25519 key pairs for ``sites``: each site's file holds its private key and all public keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = serialization.Encoding.Raw
    private = {s: X25519PrivateKey.generate() for s in sites}
    public = {s: k.public_key().public_bytes(raw, serialization.PublicFormat.Raw).hex() for s, k in private.items()}
    return {s: SiteKeys(s, k.private_bytes(raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption()).hex(), public)
            for s, k in private.items()}


def pair_secrets(keys: SiteKeys) -> dict[str, bytes]:
    """The secret this site shares with each peer (X25519, then SHA-256 with both names)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    own = X25519PrivateKey.from_private_bytes(bytes.fromhex(keys.private_key))
    out = {}
    for peer, pub in keys.public_keys.items():
        if peer == keys.site:
            continue
        shared = own.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(pub)))
        lo, hi = sorted((keys.site, peer))
        out[peer] = hashlib.sha256(shared + f"fedbrain-secagg|{lo}|{hi}".encode()).digest()
    return out


def _stream(secret: bytes, round_: int, name: str, shape: tuple) -> np.ndarray:
    seed = hashlib.sha256(secret + f"|{round_}|{name}".encode()).digest()
    gen = np.random.Generator(np.random.Philox(key=int.from_bytes(seed[:16], "little")))
    return gen.integers(0, 2**64, size=shape, dtype=np.uint64, endpoint=False)


def quantise(values: np.ndarray) -> np.ndarray:
    """Fixed point in Z/2^64 (two's complement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and np.abs(v).max() >= _LIMIT:
        raise SecureAggregationError(f"a weighted update of {np.abs(v).max():.3g} is too large for secure "
                                     f"aggregation's fixed point (< {_LIMIT:.3g})")
    return np.rint(v * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)


def dequantise(total: np.ndarray) -> np.ndarray:
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS


def mask_update(delta: dict[str, np.ndarray], weight: float, keys: SiteKeys, round_: int,
                secrets: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """``weight x delta`` quantised and masked for this round: what the site sends (int64 arrays)."""
    secrets = secrets if secrets is not None else pair_secrets(keys)
    out = {}
    with np.errstate(over="ignore"):  # arithmetic mod 2^64
        for name, d in delta.items():
            y = quantise(np.asarray(d, dtype=np.float64) * weight)
            for peer, secret in secrets.items():
                m = _stream(secret, round_, name, y.shape)
                y = y + m if keys.site < peer else y - m
            out[name] = y.view(np.int64)
    return out


def add_masked(acc: dict[str, np.ndarray], masked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``acc + masked`` mod 2^64 (the server's running sum: still masked until every site is in)."""
    with np.errstate(over="ignore"):
        for k, v in masked.items():
            u = np.asarray(v).view(np.uint64) if np.asarray(v).dtype == np.int64 else np.asarray(v, np.uint64)
            acc[k] = acc[k] + u if k in acc else u.copy()
    return acc


__all__ = ["FRACTION_BITS", "SiteKeys", "SecureAggregationError", "provision_keys", "pair_secrets",
           "mask_update", "add_masked", "quantise", "dequantise"]
