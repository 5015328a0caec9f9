"""Mailbox cryptography, all in the parent: the sandbox sees plaintext only.

Message bodies between a pod and its modeller are sealed with the task's
AES-256-GCM key. The same format serves bytes in memory and files streamed
through a spool, so a 256 MiB update never needs two copies in memory::

    b"SE1" | nonce (12 bytes) | ciphertext | tag (16 bytes)

The associated data binds each body to its task and message type, so a sealed
body cannot be replayed as another. Secure-aggregation shares between pods are
sealed with the recipient pod's RSA key (OAEP, SHA-256), with the task, the
sending pod and the recipient pod in the OAEP label: a share sealed for one
task opens for no other task, and for no other pair of pods.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from executor.errors import DecryptionError as DecryptionError
from executor.sandbox.contract import MAX_SHARE_BYTES

MAGIC = b"SE1"
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + NONCE_BYTES
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES
AES_KEY_BYTES = 32
STREAM_CHUNK = 1024 * 1024


def associated_data(task_id: str, message_type: str) -> bytes:
    """What each sealed body is bound to."""
    return f"sandbox-executor/v1|{task_id}|{message_type}".encode()


def share_label(task_id: str, sender: str, recipient: str) -> bytes:
    """What each secure share is bound to: its task and the two pods (the OAEP label)."""
    # JSON, so that no choice of pod names makes two different triples one label.
    return b"sandbox-executor/v1|SECURE_SHARE|" + json.dumps([task_id, sender, recipient]).encode()


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


@dataclass(frozen=True)
class TaskKeys:
    """The keys of one task. They never leave the parent.

    Attributes:
        aes_key: The 32-byte task key shared with the modeller.
        pod_private_key: This pod's RSA key, for secure shares addressed to it.
        peer_public_keys: Other pods' RSA public keys, by pod identifier.
    """

    aes_key: bytes = field(repr=False)
    pod_private_key: rsa.RSAPrivateKey | None = field(default=None, repr=False)
    peer_public_keys: dict[str, rsa.RSAPublicKey] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.aes_key) != AES_KEY_BYTES:
            raise ValueError(f"the task's AES key must be {AES_KEY_BYTES} bytes, not {len(self.aes_key)}")

    @classmethod
    def generate(cls) -> TaskKeys:
        """A fresh random task key (for demos and tests; normally the modeller's)."""
        return cls(aes_key=AESGCM.generate_key(bit_length=256))


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` in memory."""
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Check and decrypt a body made by :func:`seal` or :func:`seal_stream`.

    Raises:
        DecryptionError: The body is malformed or fails authentication.
    """
    if len(sealed) < OVERHEAD_BYTES or not sealed.startswith(MAGIC):
        raise DecryptionError("sealed message is malformed")
    nonce = sealed[len(MAGIC) : HEADER_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, sealed[HEADER_BYTES:], aad)
    except InvalidTag:
        raise DecryptionError("sealed message failed authentication (wrong key, or tampered)") from None


def seal_stream(key: bytes, chunks: Iterator[bytes], out: BinaryIO, aad: bytes) -> int:
    """Encrypt ``chunks`` into ``out`` in the :func:`seal` format; return plaintext bytes.

    Memory use is one chunk, whatever the total size.
    """
    nonce = os.urandom(NONCE_BYTES)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    out.write(MAGIC + nonce)
    total = 0
    for chunk in chunks:
        total += len(chunk)
        out.write(encryptor.update(chunk))
    out.write(encryptor.finalize())
    out.write(encryptor.tag)
    return total


def open_stream(key: bytes, sealed_path: Path, out: BinaryIO, aad: bytes) -> int:
    """Decrypt the sealed file into ``out``; return plaintext bytes.

    Plaintext written before the tag is checked is only in ``out``, which the
    caller must discard when this raises; nothing unauthenticated is passed on.

    Raises:
        DecryptionError: The file is malformed or fails authentication.
    """
    size = sealed_path.stat().st_size
    if size < OVERHEAD_BYTES:
        raise DecryptionError("sealed message is malformed")
    with sealed_path.open("rb") as f:
        header = f.read(HEADER_BYTES)
        if not header.startswith(MAGIC):
            raise DecryptionError("sealed message is malformed")
        f.seek(size - TAG_BYTES)
        tag = f.read(TAG_BYTES)
        f.seek(HEADER_BYTES)
        decryptor = Cipher(algorithms.AES(key), modes.GCM(header[len(MAGIC) :], tag)).decryptor()
        decryptor.authenticate_additional_data(aad)
        remaining = size - OVERHEAD_BYTES
        total = 0
        while remaining:
            chunk = f.read(min(STREAM_CHUNK, remaining))
            remaining -= len(chunk)
            total += len(chunk)
            out.write(decryptor.update(chunk))
        try:
            out.write(decryptor.finalize())
        except InvalidTag:
            raise DecryptionError("sealed message failed authentication (wrong key, or tampered)") from None
    return total


def seal_share(public_key: rsa.RSAPublicKey, share: bytes, label: bytes) -> bytes:
    """Encrypt a secure-aggregation share for the pod holding ``public_key``.

    Args:
        public_key: The recipient pod's key.
        share: The plaintext share.
        label: :func:`share_label` of the task, this pod and the recipient.
    """
    if len(share) > MAX_SHARE_BYTES:
        raise ValueError(f"a secure share may be at most {MAX_SHARE_BYTES} bytes")
    return public_key.encrypt(share, _oaep(label))


def open_share(private_key: rsa.RSAPrivateKey, sealed: bytes, label: bytes) -> bytes:
    """Decrypt a share addressed to this pod.

    Args:
        private_key: This pod's key.
        sealed: What :func:`seal_share` made.
        label: :func:`share_label` of this task, the sending pod and this pod.

    Raises:
        DecryptionError: It was not sealed for this pod's key, this task and
            this sender, or was altered.
    """
    try:
        return private_key.decrypt(sealed, _oaep(label))
    except ValueError:
        raise DecryptionError(
            "secure share failed decryption (not for this pod's key, this task or this sender)"
        ) from None
