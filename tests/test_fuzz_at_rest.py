"""Fuzzed sealed files (issue 18): any payload seals and opens to itself, and random bytes, a
flipped bit, a cut, another place or another key are refused with one `AtRestError` line,
never opened; a key file that is not 32 bytes is refused with one `KeyFileError` line."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fedllm.errors import KeyFileError
from fedllm.secure.at_rest import (
    MAGIC,
    SUFFIX,
    VERSION,
    AtRestError,
    AtRestKey,
    load_key,
    make_key_file,
    open_sealed,
    read_file,
    seal,
    write_file,
)

_names = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-at-rest")


@pytest.fixture(scope="module")
def other_keys(folder: Path, at_rest_key: AtRestKey) -> list[AtRestKey]:
    """Another key, and a forgery: another secret under this key's id (the id check passes,
    so only AES-GCM's tag can refuse it)."""
    other = make_key_file(folder / "other.key")
    return [other, AtRestKey(other.secret, at_rest_key.id, other.path)]


def _refused(key: AtRestKey, blob: bytes, aad: bytes) -> None:
    with pytest.raises(AtRestError) as caught:
        open_sealed(key, blob, aad=aad, what="the blob")
    assert len(str(caught.value).splitlines()) == 1 and "the blob" in str(caught.value)


@given(st.binary(max_size=300), st.binary(max_size=40), st.data())
def test_a_sealed_payload_opens_to_itself_and_any_damage_is_refused(
    at_rest_key: AtRestKey,
    other_keys: list[AtRestKey],
    payload: bytes,
    aad: bytes,
    data: st.DataObject,
) -> None:
    # Prepare
    blob = seal(at_rest_key, payload, aad=aad)
    at = data.draw(st.integers(0, len(blob) - 1))
    flipped = blob[:at] + bytes([blob[at] ^ (1 << data.draw(st.integers(0, 7)))]) + blob[at + 1 :]
    # Execute, Assert
    assert open_sealed(at_rest_key, blob, aad=aad, what="the blob") == payload
    _refused(at_rest_key, flipped, aad)
    _refused(at_rest_key, blob[: data.draw(st.integers(0, len(blob) - 1))], aad)
    _refused(at_rest_key, blob, aad + data.draw(st.binary(min_size=1, max_size=4)))  # another place
    for wrong in other_keys:
        _refused(wrong, blob, aad)


@given(
    st.one_of(
        st.binary(max_size=80),
        st.binary(max_size=60).map(lambda b: MAGIC + b),
        st.binary(max_size=60).map(lambda b: MAGIC + bytes([VERSION]) + b),
    ),
    st.integers(0, 2),
)
@example(MAGIC, 0)  # the header alone: no version byte
@example(MAGIC + bytes([VERSION]) + b"0123456\nfedllm: x" + bytes(28), 0)  # a key id with a break
def test_random_bytes_never_open(
    at_rest_key: AtRestKey, other_keys: list[AtRestKey], blob: bytes, which: int
) -> None:
    """Bytes that start like a sealed blob (its magic, its version) or not at all."""
    _refused([at_rest_key, *other_keys][which], blob, b"label")


def _read_refused(path: Path, key: AtRestKey | None, label: str, named: Path) -> None:
    with pytest.raises(AtRestError, match=re.escape(str(named))) as caught:
        read_file(path, key, label=label)
    assert len(str(caught.value).splitlines()) == 1, caught.value


@given(st.binary(max_size=120), st.sampled_from(["sealed", "plain"]), st.booleans())
@example(b"x" * 20 + b"\nfedllm: forged" + b"y" * 20, "sealed", False)  # its error was two lines
def test_a_checkpoint_file_reads_only_as_it_was_written(
    folder: Path, at_rest_key: AtRestKey, payload: bytes, stored: str, with_key: bool
) -> None:
    """A file written sealed reads back only with its key and label, a plaintext one only
    without a key; random bytes in the sealed file's place are refused."""
    # Prepare
    path = folder / f"tensor-{next(_names)}.safetensors"
    written = write_file(
        path, payload, at_rest_key if stored == "sealed" else None, label="round-1/a"
    )
    reader = at_rest_key if with_key else None
    # Execute, Assert
    if (stored == "sealed") == with_key:
        assert read_file(path, reader, label="round-1/a") == payload
    else:
        _read_refused(path, reader, "round-1/a", written)
    if stored == "sealed":
        with pytest.raises(AtRestError):
            read_file(path, at_rest_key, label="round-2/a")  # a file copied to another round
        written.write_bytes(payload)  # random bytes where a sealed file belongs
        _read_refused(path, reader, "round-1/a", written)
        assert written.name.endswith(SUFFIX)


@given(st.binary(max_size=64))
@example(b"")
def test_a_key_file_is_refused_in_one_line_unless_it_holds_32_bytes(
    folder: Path, content: bytes
) -> None:
    # Prepare
    path = folder / f"key-{next(_names)}"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    # Execute
    try:
        loaded = load_key(path)
    except KeyFileError as e:
        # Assert
        assert len(content) != 32 and len(str(e).splitlines()) == 1 and str(path) in str(e)
        return
    assert loaded.secret == content and len(content) == 32
