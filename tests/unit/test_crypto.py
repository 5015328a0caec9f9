"""The parent's mailbox crypto: AES-GCM in memory and streamed, RSA shares."""

from __future__ import annotations

import io
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from executor.mailbox.crypto import (
    HEADER_BYTES,
    SEGMENT_BYTES,
    TAG_BYTES,
    DecryptionError,
    TaskKeys,
    associated_data,
    open_sealed,
    open_segments,
    open_share,
    open_stream,
    plaintext_size,
    seal,
    seal_share,
    seal_stream,
    share_label,
)

AAD = associated_data("task-1", "TRAINING_UPDATE")


def test_round_trip_in_memory():
    key = TaskKeys.generate().aes_key
    assert open_sealed(key, seal(key, b"weights", AAD), AAD) == b"weights"


def test_wrong_key_fails_loudly():
    sealed = seal(TaskKeys.generate().aes_key, b"weights", AAD)
    with pytest.raises(DecryptionError, match="failed authentication"):
        open_sealed(TaskKeys.generate().aes_key, sealed, AAD)


def test_body_is_bound_to_task_and_type():
    key = TaskKeys.generate().aes_key
    sealed = seal(key, b"weights", AAD)
    for other in (associated_data("task-2", "TRAINING_UPDATE"), associated_data("task-1", "TASK_ABORT")):
        with pytest.raises(DecryptionError):
            open_sealed(key, sealed, other)


def test_tampering_is_detected():
    key = TaskKeys.generate().aes_key
    sealed = bytearray(seal(key, b"weights", AAD))
    sealed[-20] ^= 1
    with pytest.raises(DecryptionError):
        open_sealed(key, bytes(sealed), AAD)
    with pytest.raises(DecryptionError, match="malformed"):
        open_sealed(key, b"SE1short", AAD)


def test_stream_format_matches_in_memory_format(tmp_path):
    key = TaskKeys.generate().aes_key
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "sealed"
    with path.open("wb") as out:
        n = seal_stream(key, iter([data[:1000], data[1000:]]), out, AAD)
    assert n == len(data)
    assert open_sealed(key, path.read_bytes(), AAD) == data
    out = io.BytesIO()
    assert open_stream(key, path, out, AAD) == len(data)
    assert out.getvalue() == data
    # and the other way round
    path.write_bytes(seal(key, data, AAD))
    out = io.BytesIO()
    open_stream(key, path, out, AAD)
    assert out.getvalue() == data


def test_stream_with_wrong_key_fails(tmp_path):
    path = tmp_path / "sealed"
    with path.open("wb") as out:
        seal_stream(TaskKeys.generate().aes_key, iter([b"x" * 5000]), out, AAD)
    with pytest.raises(DecryptionError):
        open_stream(TaskKeys.generate().aes_key, path, io.BytesIO(), AAD)


def test_task_key_must_be_256_bits_and_hidden_from_repr():
    with pytest.raises(ValueError, match="32 bytes"):
        TaskKeys(aes_key=b"short")
    keys = TaskKeys.generate()
    assert keys.aes_key.hex() not in repr(keys)
    assert repr(keys.aes_key) not in repr(keys)


def test_shares_open_only_with_the_recipient_key():
    recipient = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    label = share_label("task-1", "pod-a", "pod-b")
    sealed = seal_share(recipient.public_key(), b"share-17", label)
    assert open_share(recipient, sealed, label) == b"share-17"
    with pytest.raises(DecryptionError):
        open_share(stranger, sealed, label)
    with pytest.raises(ValueError, match="at most"):
        seal_share(recipient.public_key(), b"x" * 500, label)


def test_a_share_sealed_for_one_task_and_pair_of_pods_opens_for_no_other():
    recipient = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sealed = seal_share(recipient.public_key(), b"share-x", share_label("task-x", "pod-a", "pod-b"))
    assert open_share(recipient, sealed, share_label("task-x", "pod-a", "pod-b")) == b"share-x"
    for task, sender, to in [
        ("task-y", "pod-a", "pod-b"),  # a later task of the same pods
        ("task-x", "pod-c", "pod-b"),  # claimed by another sender
        ("task-x", "pod-a", "pod-c"),  # another recipient with the same key
        ("task-x", "pod-b", "pod-a"),  # the other direction
    ]:
        with pytest.raises(DecryptionError):
            open_share(recipient, sealed, share_label(task, sender, to))


def test_share_labels_cannot_be_confused_by_separators():
    assert share_label("t", "a|b", "c") != share_label("t", "a", "b|c")
    assert share_label("t", 'a", "b', "c") != share_label("t", "a", 'b", "c')


SEG = SEGMENT_BYTES
SEALED_SEG = SEG + TAG_BYTES


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 5])
def test_segmented_bodies_of_every_shape_round_trip_and_their_size_is_known_from_outside(size, tmp_path):
    key = TaskKeys.generate().aes_key
    data = os.urandom(size)
    sealed = seal(key, data, AAD)
    assert plaintext_size(len(sealed)) == size
    segments = list(open_segments(key, io.BytesIO(sealed), len(sealed), AAD))
    assert b"".join(segments) == data
    assert all(len(s) == SEG for s in segments[:-1])
    assert len(segments[-1]) <= SEG
    path = tmp_path / "sealed"
    with path.open("wb") as out:
        # Chunks that straddle segment boundaries make the same body.
        assert seal_stream(key, iter([data[:7], data[7 : SEG + 3], data[SEG + 3 :]]), out, AAD) == size
    assert plaintext_size(path.stat().st_size) == size
    assert open_sealed(key, path.read_bytes(), AAD) == data


def _segments(sealed: bytes) -> tuple[bytes, list[bytes]]:
    body = sealed[HEADER_BYTES:]
    return sealed[:HEADER_BYTES], [body[i : i + SEALED_SEG] for i in range(0, len(body), SEALED_SEG)]


def test_a_segmented_body_cut_short_extended_or_reordered_fails_authentication():
    key = TaskKeys.generate().aes_key
    sealed = seal(key, os.urandom(3 * SEG + 5), AAD)
    header, parts = _segments(sealed)
    assert len(parts) == 4
    other = seal(key, os.urandom(3 * SEG + 5), AAD)
    forged = {
        # The last segment dropped: the new last one was not sealed as last.
        "cut at a segment boundary": header + b"".join(parts[:-1]),
        "extended by a segment": header + b"".join(parts) + parts[-1],
        "two segments swapped": header + parts[1] + parts[0] + b"".join(parts[2:]),
        "a segment from another body": header + parts[0] + _segments(other)[1][1] + b"".join(parts[2:]),
    }
    for what, body in forged.items():
        with pytest.raises(DecryptionError, match="failed authentication"):
            open_sealed(key, body, AAD)
        assert what  # (named for the failure message)


def test_a_bad_segment_stops_the_stream_after_the_authentic_ones_before_it():
    key = TaskKeys.generate().aes_key
    data = os.urandom(2 * SEG + 10)
    sealed = bytearray(seal(key, data, AAD))
    sealed[HEADER_BYTES + SEALED_SEG + 5] ^= 1  # inside the second segment
    stream = open_segments(key, io.BytesIO(bytes(sealed)), len(sealed), AAD)
    assert next(stream) == data[:SEG]  # the first segment is authentic, and only it came out
    with pytest.raises(DecryptionError, match="failed authentication"):
        next(stream)


def test_sizes_no_sealer_makes_are_malformed():
    key = TaskKeys.generate().aes_key
    for body in (b"", b"SE2", b"SE2" + b"p" * 7 + b"t" * (TAG_BYTES - 1), b"XX2" + b"\0" * 40):
        with pytest.raises(DecryptionError, match="malformed"):
            open_sealed(key, body, AAD)


def test_bodies_sealed_in_the_earlier_single_tag_format_still_open(tmp_path):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = TaskKeys.generate().aes_key
    data = os.urandom(SEG + 3)
    nonce = os.urandom(12)
    legacy = b"SE1" + nonce + AESGCM(key).encrypt(nonce, data, AAD)
    assert open_sealed(key, legacy, AAD) == data
    path = tmp_path / "legacy"
    path.write_bytes(legacy)
    out = io.BytesIO()
    assert open_stream(key, path, out, AAD) == len(data)
    assert out.getvalue() == data
    tampered = bytearray(legacy)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError, match="failed authentication"):
        open_sealed(key, bytes(tampered), AAD)
