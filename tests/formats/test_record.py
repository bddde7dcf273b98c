"""Fixed-size records: the struct-based layouts agree with construct, field for field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcowlib.errors import TruncatedImage
from qcowlib.formats._record import FixedLayout
from qcowlib.formats.qcow2 import extensions, header

LAYOUTS = [
    header.HEADER_V2,
    header.HEADER_V3_TAIL,
    extensions._FeatureNameEntry,
    extensions._BitmapsExt,
    extensions._CryptoExt,
    FixedLayout("mixed little-endian", "<", [("a", "B"), ("b", "H"), ("c", "3s"), ("d", "Q")]),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.what)
@given(data=st.data())
def test_parse_and_build_agree_with_construct(layout: FixedLayout, data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=layout.sizeof(), max_size=layout.sizeof() + 8))
    ours = layout.parse(raw)
    theirs = layout.as_construct().parse(raw[: layout.sizeof()])
    assert dict(ours) == {k: v for k, v in theirs.items() if not k.startswith("_")}
    assert layout.as_construct().sizeof() == layout.sizeof()
    assert layout.build(ours) == raw[: layout.sizeof()]
    assert layout.as_construct().build(dict(ours)) == raw[: layout.sizeof()]


def test_short_input_names_the_structure() -> None:
    with pytest.raises(TruncatedImage, match="qcow2 header is truncated"):
        header.HEADER_V2.parse(b"QFI\xfb", offset=0)


def test_attribute_access() -> None:
    rec = extensions._CryptoExt.parse(bytes(range(16)))
    assert rec.offset == 0x0001020304050607 and rec["length"] == 0x08090A0B0C0D0E0F
    with pytest.raises(AttributeError):
        _ = rec.missing
