"""Fuzzed HE packing (issue 18): any adapter layout packs into CKKS slot vectors and back
to the same tensors (in plain and through real TenSEAL encryption), and what comes back
from decryption with another layout, length, check slot or total weight is refused with
one `InvalidUpdateError` line, never returned as values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedllm.errors import InvalidUpdateError
from fedllm.secure.he import decrypt_chunks, encrypt_chunks, make_secret_context
from fedllm.secure.he_params import HEParams
from fedllm.secure.packing import Packing

# The smallest ring the HE checks allow (N = 4096, 2048 slots: one ciphertext holds every
# layout drawn here), so a context takes milliseconds, not seconds.
SMALL = HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40), scale_bits=40)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5)
VALUES = st.floats(-1e3, 1e3, width=32)  # a LoRA update's scale, with room to spare
WEIGHTS = st.floats(1e-3, 1e3)
# Names as an adapter has them (the layout is the run's own, from its model).
NAMES = st.from_regex(r"[a-z0-9_.]{1,8}", fullmatch=True)


@st.composite
def layouts(draw: st.DrawFn, max_slots: int = 12) -> Packing:
    """Tensors of one value or more (every adapter has some), cut into small chunks so
    most layouts span several ciphertexts."""
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    shapes = {n: draw(SHAPES) for n in names}
    return Packing.for_arrays(shapes, draw(st.integers(2, max_slots)))


def _arrays(draw: st.DrawFn, packing: Packing) -> dict[str, np.ndarray]:
    return {
        n: draw(hnp.arrays(np.float32, s, elements=VALUES))
        for n, s in zip(packing.names, packing.shapes, strict=True)
    }


@given(st.data())
def test_any_layout_packs_and_unpacks_to_the_same_tensors(data: st.DataObject) -> None:
    # Prepare
    packing = data.draw(layouts())
    arrays, weight = _arrays(data.draw, packing), data.draw(WEIGHTS)
    # Execute
    chunks = packing.pack(arrays, weight)
    back = packing.unpack(chunks, weight)
    # Assert
    assert [c.size for c in chunks] == packing.chunk_sizes
    assert all(c[-1] == weight for c in chunks)
    assert list(back) == list(packing.names)
    for name, value in arrays.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value)


@pytest.fixture(scope="module")
def ctx() -> Any:
    return make_secret_context(SMALL)


@given(st.data())
def test_any_layout_survives_real_ckks_encryption(ctx: Any, data: st.DataObject) -> None:
    """Through TenSEAL: CKKS is approximate, within ~2^-20 of each value at scale 2^40.
    Weights are a site's share (at most 1), so weighted values stay far inside what a
    site may seal (`SiteHE.seal` refuses past `max_sum_magnitude`, 2^18 here)."""
    # Prepare
    packing = data.draw(layouts(max_slots=SMALL.slots))
    arrays, weight = _arrays(data.draw, packing), data.draw(st.floats(1e-3, 1.0))
    # Execute
    blobs = encrypt_chunks(ctx, packing.pack(arrays, weight))
    back = packing.unpack(decrypt_chunks(ctx, blobs, what="fuzz"), weight)
    # Assert
    for name, value in arrays.items():
        np.testing.assert_allclose(back[name], value, rtol=1e-5, atol=1e-5)


@given(
    st.data(),
    st.lists(hnp.arrays(np.float64, st.integers(0, 14)), max_size=5),
    st.floats() | st.sampled_from([0.0, 1e-300, -1.0]),
)
@example(  # a total weight of 0 with check slots of 0 once unpacked to NaN and inf
    data=None, chunks=[np.array([1.0, 0.0, 0.0])], divisor=0.0
)
@example(data=None, chunks=[np.array([1.0, 1.0, 1e-300])], divisor=1e-300)  # 1e300: past float32
def test_decrypted_chunks_of_another_layout_or_weight_are_refused(
    data: st.DataObject | None, chunks: list[np.ndarray], divisor: float
) -> None:
    """Whatever decryption gave (chunks of any count, length and values) and whatever total
    weight was claimed: refused, or returned only when every check slot matched it."""
    packing = data.draw(layouts()) if data is not None else Packing.for_arrays({"x": (2,)}, 4)
    try:
        back = packing.unpack(chunks, divisor, what="the aggregate")
    except InvalidUpdateError as e:
        assert len(str(e).splitlines()) == 1 and "the aggregate" in str(e), e
        return
    assert [c.size for c in chunks] == packing.chunk_sizes
    assert all(abs(c[-1] - divisor) <= 1e-3 * max(1.0, abs(divisor)) for c in chunks)
    for name, shape in zip(packing.names, packing.shapes, strict=True):
        assert back[name].shape == shape and np.all(np.isfinite(back[name]))


@given(st.data(), st.dictionaries(NAMES, hnp.arrays(np.float32, SHAPES)))
@example(  # same number of values, other shapes: once packed into each other's slots
    data=None, arrays={"a": np.zeros((3,), np.float32), "b": np.zeros((2, 3), np.float32)}
)
def test_tensors_that_do_not_fit_the_layout_are_refused_by_name(
    data: st.DataObject | None, arrays: dict[str, np.ndarray]
) -> None:
    # Prepare
    packing = (
        data.draw(layouts())
        if data is not None
        else Packing.for_arrays({"a": (2, 3), "b": (3,)}, 4)
    )
    # Execute
    try:
        packing.pack(arrays, 1.0)
    except InvalidUpdateError as e:
        # Assert
        assert len(str(e).splitlines()) == 1 and any(f"'{n}'" in str(e) for n in packing.names)
        return
    for name, shape in zip(packing.names, packing.shapes, strict=True):
        assert arrays[name].shape == shape
