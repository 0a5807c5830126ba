"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, without dropout recovery): the server learns the
sum of the sites' weighted updates and nothing about any single one.

Each hospital makes its own X25519 key pair on first use, in its own folder (never in the kit the coordinator
hands out, never in the job); only the public key leaves, through the server, signed with the site's NVFlare
kit key where the site has one (peers check the signature against the site's certificate and the project's
root CA; without certificates, in the simulator, the server is trusted not to substitute keys). Every pair of
sites shares a secret (X25519). Each round a site quantises ``weight x (its weights - the global weights)`` to
fixed point in Z/2^64 and adds one ChaCha20 keystream per peer (+ for peers after it, - for peers before it),
keyed by HKDF-SHA256 of the pair's secret bound to the job, the round, the tensor and the ordered pair of site
names. A canary tensor (a known value from every site) tells the server whether the masks cancelled. The site's
ledger refuses to mask a (job, round) twice or a round at or below one it has passed, so a server cannot collect
two differently masked answers under one mask. The price: every site must answer every round (a missing site's
masks do not cancel, and the round keeps the global model), and the server cannot check a single update.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FRACTION_BITS = 32  # fixed point: 2^-32 resolution
_RANGE = 2.0 ** (63 - FRACTION_BITS)  # |sum| below this cannot wrap in int64
CANARY = "__secagg_canary__"  # a tensor every site fills with CANARY_VALUE: the unmasked sum must be n x it
CANARY_VALUE = 1.0
CANARY_SIZE = 4
KEY_EXCHANGE = "secagg_key_exchange"  # the server's meta flag: "send your public key" (before round 0)
PUBLIC_KEYS = "secagg_public_keys"  # the server's meta: every site's announcement (public key, signature, cert)
REFUSED = "secagg_refused"  # a site's meta: why it sent no masked update this round
SESSION = "secagg_session"  # the server's meta: one execution of a job (heeded only where the server is trusted)
KEY_FILE = "secagg_private_key.json"  # in the site's key folder (0600)
LEDGER_FILE = "secagg_ledger.json"  # the (job, round)s this site has masked
KEY_DIR_ENV = "FEDBRAIN_SECAGG_DIR"  # a site's key folder, where its admin wants it


class SecureAggregationError(ValueError):
    """Missing or forged keys, a refused round, a site missing from a round, or a value out of range."""


def secure_aggregation_on(settings, n_sites: int) -> bool:
    """Whether a job aggregates securely: its explicit choice, else (None) on with 3 or more sites when the
    algorithm and weighting allow it (fedavg/fedprox, sample weighting, every site in every round)."""
    if settings.secure_aggregation is not None:
        return bool(settings.secure_aggregation)
    return (n_sites >= 3 and settings.algorithm != "scaffold" and settings.site_weighting == "samples"
            and not settings.min_clients)


def per_site_limit(n_sites: int) -> float:
    """The largest |weight x update| one site may mask: n sites' sum then stays below half the int64 range."""
    return _RANGE / (2 * max(1, n_sites))


def quantise(values: np.ndarray, limit: float = _RANGE / 2) -> np.ndarray:
    """Fixed point in Z/2^64 (two's complement); a non-finite or too large value is refused."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and not np.isfinite(v).all():
        raise SecureAggregationError("the update is not finite: this site refuses to mask it")
    if v.size and np.abs(v).max() >= limit:
        raise SecureAggregationError(f"a weighted update of {np.abs(v).max():.3g} is too large for secure "
                                     f"aggregation's fixed point (< {limit:.3g})")
    return np.rint(v * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)


def dequantise(total: np.ndarray) -> np.ndarray:
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS


def mask_key(secret: bytes, job_id: str, round_: int, name: str, pair: tuple[str, str]) -> bytes:
    """HKDF-SHA256 of a pair's secret, bound to the job, the round, the tensor and the ordered pair of sites."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = json.dumps(["fedbrain-secagg-v2", job_id, int(round_), name, *pair]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=f"fedbrain-secagg|{job_id}".encode(),
                info=info).derive(secret)


def mask_stream(key: bytes, shape: tuple) -> np.ndarray:
    """Uniform 64-bit integers: the ChaCha20 keystream of ``key`` (a fresh key per stream, so a zero nonce)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    n = int(np.prod(shape, dtype=np.int64))
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64).reshape(shape)


def add_masked(acc: dict[str, np.ndarray], masked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``acc + masked`` mod 2^64 (the server's running sum: still masked until every site is in)."""
    with np.errstate(over="ignore"):
        for k, v in masked.items():
            u = np.asarray(v).view(np.uint64) if np.asarray(v).dtype == np.int64 else np.asarray(v, np.uint64)
            acc[k] = acc[k] + u if k in acc else u.copy()
    return acc


def check_unmasked(total: dict[str, np.ndarray], n_sites: int) -> dict[str, np.ndarray]:
    """The server's checks of an unmasked sum: the canary (else the keys do not match), range and finiteness;
    the dequantised sums without the canary."""
    if CANARY not in total:
        raise SecureAggregationError("the masked sum has no canary: not a fedbrain secure aggregation")
    canary = dequantise(total[CANARY])
    if not np.array_equal(canary, np.full(canary.shape, n_sites * CANARY_VALUE)):
        raise SecureAggregationError("secure aggregation keys do not match: the canary did not unmask to "
                                     f"{n_sites * CANARY_VALUE:g} (the masks did not cancel)")
    out = {k: dequantise(v) for k, v in total.items() if k != CANARY}
    bound = n_sites * per_site_limit(n_sites)
    for k, v in out.items():
        if not np.isfinite(v).all() or (v.size and np.abs(v).max() > bound):
            raise SecureAggregationError(f"the unmasked sum of {k} is out of range (|x| > {bound:.3g}: an int64 "
                                         "wrap or a site that skipped its range check)")
    return out


# ------------------------------------------------------------------ the site's side


def _private_key(folder: Path, site: str):
    """This site's X25519 private key: made on first use in ``folder`` (0700, file 0600) and never sent."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    path = folder / KEY_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            if raw["site"] != site:
                raise SecureAggregationError(f"{path} holds the key of {raw['site']!r}, not of {site!r}")
            return X25519PrivateKey.from_private_bytes(bytes.fromhex(raw["private_key"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecureAggregationError(f"cannot read this site's secure-aggregation key {path}: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"site": site, "private_key": raw}, fh)
    return key


def _signed_text(site: str, public_key: str) -> bytes:
    return f"fedbrain-secagg-public-key|{site}|{public_key}".encode()


def _sign(key_pem: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise SecureAggregationError(f"cannot sign with a {type(key).__name__} kit key")


def verify_announcement(site: str, ann: dict, root_ca_pem: bytes) -> None:
    """Raise unless ``ann``'s public key is signed by the holder of a certificate for ``site`` from the root CA."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(str(ann.get("certificate") or "").encode())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(root_ca_pem))
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [site]:
            raise SecureAggregationError(f"the certificate sent for {site!r} is {names}'s")
        pub, sig = cert.public_key(), bytes.fromhex(str(ann.get("signature") or ""))
        data = _signed_text(site, str(ann.get("public_key")))
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise SecureAggregationError(f"{site!r}: unsupported certificate key {type(pub).__name__}")
    except (ValueError, TypeError, InvalidSignature) as exc:
        if isinstance(exc, SecureAggregationError):
            raise
        raise SecureAggregationError(f"the public key announced for {site!r} is not signed by its NVFlare "
                                     f"certificate ({type(exc).__name__}): refusing it") from exc


class SiteMasker:
    """One site's secure aggregation: its key (in ``folder``), its ledger, its kit (``startup/`` with client.key,
    client.crt and rootCA.pem; None in the simulator) and the masking of its updates."""

    def __init__(self, site: str, folder: Path, kit_startup: Path | None = None):
        self.site, self.folder = site, Path(folder)
        self.kit = kit_startup if kit_startup is not None and (kit_startup / "rootCA.pem").is_file() else None
        self._key = _private_key(self.folder, site)
        self._secrets: dict[str, bytes] = {}
        self._peers_seen: dict | None = None

    @property
    def public_key(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def announcement(self) -> dict:
        """What this site sends in the key exchange: its public key, signed with its kit key where it has one."""
        ann = {"public_key": self.public_key, "signature": "", "certificate": ""}
        if self.kit is not None:
            ann["signature"] = _sign((self.kit / "client.key").read_bytes(),
                                     _signed_text(self.site, ann["public_key"])).hex()
            ann["certificate"] = (self.kit / "client.crt").read_text()
        return ann

    def peer_secrets(self, announcements: dict) -> dict[str, bytes]:
        """The secret shared with each peer, from the server's broadcast (checked against certificates)."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        if not isinstance(announcements, dict) or self.site not in announcements:
            raise SecureAggregationError(f"{self.site}: the server sent no public-key set holding this site")
        if announcements[self.site].get("public_key") != self.public_key:
            raise SecureAggregationError(f"{self.site}: the server's key set holds another key for this site")
        if announcements == self._peers_seen:
            return self._secrets
        root = (self.kit / "rootCA.pem").read_bytes() if self.kit is not None else None
        secrets = {}
        for peer, ann in announcements.items():
            if peer == self.site:
                continue
            if root is not None:
                verify_announcement(peer, ann, root)
            secrets[peer] = self._key.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(ann["public_key"])))
        self._secrets, self._peers_seen = secrets, announcements
        return secrets

    def job_identity(self, job_id: str, session: str | None) -> str:
        """What masks and the ledger bind to: the NVFlare job id; without certificates (the simulator, whose jobs
        are all "simulate_job" and whose server is trusted anyway) also the server's session of this execution."""
        return f"{job_id}/{session}" if self.kit is None and session else job_id

    def claim_round(self, job_id: str, round_: int) -> None:
        """The ledger: refuse a (job, round) already masked or a round at or below one this site has passed."""
        path = self.folder / LEDGER_FILE
        ledger = json.loads(path.read_text()) if path.is_file() else {}
        last = ledger.get(job_id)
        if last is not None and int(round_) <= int(last):
            raise SecureAggregationError(f"{self.site} already masked round {last} of job {job_id}: it refuses to "
                                         f"mask round {round_} (a repeated or reused round would unmask it)")
        ledger[job_id] = int(round_)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(ledger))
        tmp.replace(path)

    def mask(self, delta: dict[str, np.ndarray], weight: float, job_id: str, round_: int,
             announcements: dict) -> dict[str, np.ndarray]:
        """``weight x delta`` quantised, with the canary, masked for (job, round): what the site sends (int64)."""
        secrets = self.peer_secrets(announcements)
        limit = per_site_limit(len(secrets) + 1)
        values = {name: quantise(np.asarray(d, dtype=np.float64) * weight, limit) for name, d in delta.items()}
        values[CANARY] = quantise(np.full(CANARY_SIZE, CANARY_VALUE))
        self.claim_round(job_id, round_)  # recorded before anything masked leaves
        out = {}
        with np.errstate(over="ignore"):  # arithmetic mod 2^64
            for name, y in values.items():
                for peer, secret in secrets.items():
                    pair = tuple(sorted((self.site, peer)))
                    m = mask_stream(mask_key(secret, job_id, round_, name, pair), y.shape)
                    y = y + m if self.site < peer else y - m
                out[name] = np.asarray(y).view(np.int64)  # a 0-d tensor (num_batches_tracked) stays an array
        return out


def site_key_folder(site: str, kit_root: Path | None, simulated: Path | None) -> Path:
    """Where a site keeps its key and ledger: ``$FEDBRAIN_SECAGG_DIR``; else, for a deployed kit, a folder beside
    the kit's workspace (outside what NVFlare's admin commands and the job's folders reach); else the simulated
    site's own folder under the run."""
    if os.environ.get(KEY_DIR_ENV):
        return Path(os.environ[KEY_DIR_ENV])
    if kit_root is not None:
        return kit_root.parent / f"{kit_root.name}.fedbrain-secagg"
    if simulated is not None:
        return simulated
    raise SecureAggregationError(f"{site}: no kit and no run folder to keep its secure-aggregation key in "
                                 f"(set ${KEY_DIR_ENV})")


__all__ = ["FRACTION_BITS", "CANARY", "KEY_EXCHANGE", "PUBLIC_KEYS", "REFUSED", "SESSION", "SecureAggregationError",
           "SiteMasker", "secure_aggregation_on", "site_key_folder", "verify_announcement", "check_unmasked",
           "add_masked", "quantise", "dequantise", "mask_key", "mask_stream", "per_site_limit"]
