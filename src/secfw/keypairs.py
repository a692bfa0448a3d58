"""SSH key pairs: generating one, checking a public key, its fingerprint.

``keypair-add NAME`` generates an RSA 2048 key pair (what nova generates): the
public half is stored, the private half is returned once and never stored.
``keypair-add --pub-key FILE NAME`` registers a public key, which must be a real
OpenSSH public key (``ssh-rsa``, ``ssh-ed25519``, ``ecdsa-sha2-*``), parsed by the
``cryptography`` package rather than matched by pattern. The fingerprint is
nova's: the MD5 of the key blob, as colon-separated hex.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from secfw.errors import ValidationError

#: A public key file larger than this is not an OpenSSH public key.
MAX_PUBLIC_KEY_BYTES = 16 * 1024
#: RSA keys shorter than this are refused (OpenSSH itself refuses < 1024 bits).
MIN_RSA_BITS = 1024
GENERATED_RSA_BITS = 2048


def generate() -> tuple[str, str]:
    """A new key pair as ``(public key in OpenSSH form, private key PEM)``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return public + " Generated-by-secfw", private


def check_public_key(data: bytes | str) -> str:
    """A registered public key: one line ``TYPE BASE64 [COMMENT]``, really a key.

    Returns it normalised (surrounding whitespace removed). Raises
    ValidationError for anything else: several lines, a private key, bytes that
    are not a key, an RSA key shorter than MIN_RSA_BITS.
    """
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    if len(raw) > MAX_PUBLIC_KEY_BYTES:
        raise ValidationError(f"public key is larger than {MAX_PUBLIC_KEY_BYTES} bytes")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValidationError("public key is not an OpenSSH public key (not ASCII)") from None
    if not text or "\n" in text or "\r" in text:
        raise ValidationError("public key must be one line: TYPE BASE64 [COMMENT]")
    try:
        key = serialization.load_ssh_public_key(text.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm):
        raise ValidationError("public key is not a valid OpenSSH public key") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValidationError(
            f"RSA public key of {key.key_size} bits is too short (at least {MIN_RSA_BITS})"
        )
    return text


def fingerprint(public_key: str) -> str:
    """nova's fingerprint of an OpenSSH public key: MD5 of the blob, ``aa:bb:…``."""
    blob = base64.b64decode(public_key.split()[1])
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
