"""Mailbox cryptography, all in the parent: the sandbox sees plaintext only.

Message bodies between a pod and its modeller are sealed with the task's
AES-256-GCM key, in segments of :data:`SEGMENT_BYTES` with a tag each (the
STREAM construction), so a body of any size is sealed and opened one segment
at a time and each segment is authenticated before any of it is passed on::

    b"SE2" | nonce prefix (7 bytes) | segment 0 | segment 1 | ... | last segment
    segment i = AES-GCM(key, nonce = prefix | i (4 bytes, big-endian) | last (1 byte),
                        plaintext i, associated data) -> ciphertext | tag (16 bytes)

Every segment but the last holds exactly :data:`SEGMENT_BYTES` of plaintext;
the last holds 0 to :data:`SEGMENT_BYTES` and carries the "last" flag in its
nonce, so a body cut short, reordered or extended fails authentication. The
same format serves bytes in memory and files streamed through a spool. Bodies
in the single-tag format of earlier versions (``b"SE1" | nonce | ciphertext |
tag``) are still opened.

The associated data binds each body to its task and message type, so a sealed
body cannot be replayed as another. Secure-aggregation shares between pods are
sealed with the recipient pod's RSA key (OAEP, SHA-256), with the task, the
sending pod and the recipient pod in the OAEP label: a share sealed for one
task opens for no other task, and for no other pair of pods.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from executor.errors import DecryptionError as DecryptionError
from executor.sandbox.contract import MAX_SHARE_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

MAGIC = b"SE2"
LEGACY_MAGIC = b"SE1"
NONCE_BYTES = 12
PREFIX_BYTES = 7
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + PREFIX_BYTES
LEGACY_HEADER_BYTES = len(LEGACY_MAGIC) + NONCE_BYTES
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES
"""The least a sealed body adds to its plaintext (an empty body: header and one tag)."""
AES_KEY_BYTES = 32
SEGMENT_BYTES = 1024 * 1024
"""Plaintext per sealed segment: what is held, and authenticated, at a time."""
STREAM_CHUNK = SEGMENT_BYTES
_SEALED_SEGMENT = SEGMENT_BYTES + TAG_BYTES
_MALFORMED = "sealed message is malformed"
_FAILED = "sealed message failed authentication (wrong key, or tampered)"


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


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 2**32:
        raise DecryptionError("sealed message has too many segments")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class _Sealer:
    """Seals a body segment by segment.

    The last segment is only known as last when the body ends, so up to one
    segment of plaintext is held back until more data (or the end) arrives:
    held by reference to the caller's immutable ``bytes`` (a copy of anything
    mutable), and joined only when a segment spans several chunks.
    """

    def __init__(self, key: bytes, aad: bytes, write: Callable[[bytes], object]) -> None:
        self._aead = AESGCM(key)
        self._aad = aad
        self._prefix = os.urandom(PREFIX_BYTES)
        self._write = write
        self._index = 0
        self._held: list[memoryview] = []
        self._held_bytes = 0
        self.total = 0
        write(MAGIC + self._prefix)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.total += len(data)
        view = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        while view:
            if self._held_bytes == SEGMENT_BYTES:
                self._flush(last=False)  # a full segment, and more to come
            take = min(SEGMENT_BYTES - self._held_bytes, len(view))
            self._held.append(view[:take])
            self._held_bytes += take
            view = view[take:]

    def finish(self) -> None:
        self._flush(last=True)

    def _flush(self, *, last: bool) -> None:
        held = self._held
        segment = held[0] if len(held) == 1 else b"".join(held)
        self._write(self._aead.encrypt(_nonce(self._prefix, self._index, last), segment, self._aad))
        self._index += 1
        self._held = []
        self._held_bytes = 0


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` in memory."""
    parts: list[bytes] = []
    sealer = _Sealer(key, aad, parts.append)
    sealer.update(plaintext)
    sealer.finish()
    return b"".join(parts)


def seal_stream(key: bytes, chunks: Iterator[bytes], out: BinaryIO, aad: bytes) -> int:
    """Encrypt ``chunks`` into ``out`` in the :func:`seal` format; return plaintext bytes.

    Memory use is about one segment plus one chunk, whatever the total size.
    """
    sealer = _Sealer(key, aad, out.write)
    for chunk in chunks:
        sealer.update(chunk)
    sealer.finish()
    return sealer.total


def plaintext_size(sealed_size: int) -> int:
    """The plaintext size of a body sealed in the segmented format, from its sealed size.

    Raises:
        DecryptionError: No body sealed in that format has this size.
    """
    body = sealed_size - HEADER_BYTES
    if body < TAG_BYTES:
        raise DecryptionError(_MALFORMED)
    segments = -(-body // _SEALED_SEGMENT)
    return body - TAG_BYTES * segments


def open_segments(key: bytes, sealed: BinaryIO, sealed_size: int, aad: bytes) -> Iterator[bytes]:
    """The plaintext of a segmented body, one authenticated segment at a time.

    Each segment is yielded only once its tag checked; a body cut short,
    reordered, extended or altered raises at the first segment that shows it,
    so what was yielded before is authentic but the body is not whole: the
    caller must not use it as a whole.

    Raises:
        DecryptionError: The body is malformed or fails authentication.
    """
    header = sealed.read(HEADER_BYTES)
    if len(header) != HEADER_BYTES or not header.startswith(MAGIC):
        raise DecryptionError(_MALFORMED)
    plaintext_size(sealed_size)  # the size must be one a sealer could make
    prefix = header[len(MAGIC) :]
    aead = AESGCM(key)
    remaining = sealed_size - HEADER_BYTES
    index = 0
    while remaining > 0:
        segment = sealed.read(min(_SEALED_SEGMENT, remaining))
        if len(segment) < TAG_BYTES:
            raise DecryptionError(_MALFORMED)
        remaining -= len(segment)
        try:
            yield aead.decrypt(_nonce(prefix, index, remaining == 0), segment, aad)
        except InvalidTag:
            raise DecryptionError(_FAILED) from None
        index += 1


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Check and decrypt a body made by :func:`seal` or :func:`seal_stream` (or the earlier format).

    Raises:
        DecryptionError: The body is malformed or fails authentication.
    """
    out = io.BytesIO()
    _open(key, io.BytesIO(sealed), len(sealed), out, aad)
    return out.getvalue()


def is_segmented(sealed_path: Path) -> bool:
    """Whether the sealed file is in the segmented format (it can then be opened as it streams)."""
    with sealed_path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def open_stream(key: bytes, sealed_path: Path, out: BinaryIO, aad: bytes) -> int:
    """Decrypt the sealed file into ``out``; return plaintext bytes.

    Plaintext written before the whole body is checked is only in ``out``,
    which the caller must discard when this raises; nothing unauthenticated
    is passed on.

    Raises:
        DecryptionError: The file is malformed or fails authentication.
    """
    with sealed_path.open("rb") as f:
        return _open(key, f, os.fstat(f.fileno()).st_size, out, aad)


def _open(key: bytes, sealed: BinaryIO, size: int, out: BinaryIO, aad: bytes) -> int:
    """Decrypt ``size`` sealed bytes, in either format, into ``out``; return plaintext bytes."""
    if sealed.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC:
        return _open_legacy(key, sealed, size, out, aad)
    sealed.seek(0)
    total = 0
    for segment in open_segments(key, sealed, size, aad):
        total += len(segment)
        out.write(segment)
    return total


def _open_legacy(key: bytes, f: BinaryIO, size: int, out: BinaryIO, aad: bytes) -> int:
    """The single-tag format of earlier versions, read from just after its magic."""
    if size < LEGACY_HEADER_BYTES + TAG_BYTES:
        raise DecryptionError(_MALFORMED)
    nonce = f.read(NONCE_BYTES)
    f.seek(size - TAG_BYTES)
    tag = f.read(TAG_BYTES)
    f.seek(LEGACY_HEADER_BYTES)
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad)
    remaining = size - LEGACY_HEADER_BYTES - TAG_BYTES
    total = 0
    while remaining:
        chunk = f.read(min(STREAM_CHUNK, remaining))
        remaining -= len(chunk)
        total += len(chunk)
        out.write(decryptor.update(chunk))
    try:
        out.write(decryptor.finalize())
    except InvalidTag:
        raise DecryptionError(_FAILED) from None
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
