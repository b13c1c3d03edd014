"""The Avro single-object codec: exact bytes, round trips, and clear failures."""

from __future__ import annotations

from typing import Any

import pytest
from faust.serializers import codecs

from kernel.errors import EncodeError, MalformedMessageError, UnknownSchemaError
from streams.codec import HEADER_SIZE, MARKER, AvroCodec
from streams.examples import example_events
from streams.faust_codec import register_faust_codecs

# The encoding of streams.examples.example_events(), pinned. If this fails after
# a schema edit: copy the previous .avsc to schemas/avro/history/ with the next
# v<N> (see its README), then update these bytes. Editing a released version in
# place would make every event already on a topic undecodable.
EXPECTED_HEX = {
    "credit.charge.requested": (
        "c30116ac8e65dc670fed106368672d303030310e757365722d3432086368617402107265712d30"
        "303031020c636f6e762d37166770742d346f2d6d696e692c6770742d346f2d6d696e692d323032"
        "342d30372d3138e012bc0590030000166770742d346f2d6d696e69068c06dcbccccaef66226c6c"
        "6d2d70726f7879406578616d706c65"
    ),
    "credit.grant.requested": (
        "c3012180de04b092c340146f726465722d303030310e757365722d34320080dac409146f726465"
        "722d3030303100dcbccccaef66286372656469742d73746f7265406578616d706c65"
    ),
    "credit.ledger.entries": (
        "c3012b6a02b953d955dc0e757365722d343202146f726465722d30303031103966326334653161"
        "0280dac40980dac40902146f726465722d30303031000000000000000000000000dcbccccaef66"
        "dcbccccaef66"
    ),
    "credit.commands.rejected": (
        "c301e3d05be2f6fc6a030212006e6f742d6176726f020e757365722d34322e6372656469742e63"
        "68617267652e72657175657374656406a413003e6e6f74204176726f2073696e676c652d6f626a"
        "65637420656e636f64696e6700020e757365722d3432dcbccccaef66286c65646765722d616765"
        "6e74406578616d706c65"
    ),
    "plaza.events": (
        "c301ed281a82cc57b1935e706c617a613a696d706f72743a705f3031323334353637383961626364"
        "656630313233343536373a757365722d34321a706c616e2e696d706f7274656434705f3031323334"
        "3536373839616263646566303132333435363710617574686f722d370e757365722d3432dcbcccca"
        "ef6624706c616e2d706c617a61406578616d706c6500000234705f38396162636465663031323334"
        "35363738396162636465660000"
    ),
}

EVENTS = example_events()


def _rabin_fingerprint(data: bytes) -> bytes:
    """CRC-64-AVRO written from the Avro specification, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def test_every_current_schema_has_pinned_bytes(codec: AvroCodec) -> None:
    assert sorted(codec.registry.event_types) == sorted(EXPECTED_HEX)


@pytest.mark.parametrize("event_type", sorted(EXPECTED_HEX))
def test_encoding_is_pinned(codec: AvroCodec, event_type: str) -> None:
    assert codec.encode(event_type, EVENTS[event_type]).hex() == EXPECTED_HEX[event_type]


@pytest.mark.parametrize("event_type", sorted(EXPECTED_HEX))
def test_round_trip_returns_the_record(codec: AvroCodec, event_type: str) -> None:
    decoded = codec.decode(bytes.fromhex(EXPECTED_HEX[event_type]), expected=event_type)
    assert decoded.event_type == event_type
    assert decoded.record == EVENTS[event_type]


@pytest.mark.parametrize("event_type", sorted(EXPECTED_HEX))
def test_header_is_marker_and_spec_fingerprint(codec: AvroCodec, event_type: str) -> None:
    data = codec.encode(event_type, EVENTS[event_type])
    version = codec.registry.current(event_type)
    assert data[:2] == MARKER
    assert data[2:HEADER_SIZE] == _rabin_fingerprint(version.canonical_form.encode())


def test_fingerprint_matches_the_avro_spec_example() -> None:
    # The Avro spec's single-object example: schema "int" has header C3 01 8F 5C 39 3F 1A D5 75 72.
    assert _rabin_fingerprint(b'"int"').hex() == "8f5c393f1ad57572"


def test_money_as_float_is_refused(codec: AvroCodec) -> None:
    record = dict(EVENTS["credit.charge.requested"], amount_micro=1.5)
    with pytest.raises(EncodeError, match="amount_micro"):
        codec.encode("credit.charge.requested", record)


def test_missing_required_field_is_refused(codec: AvroCodec) -> None:
    record = {k: v for k, v in EVENTS["credit.grant.requested"].items() if k != "user_id"}
    with pytest.raises(EncodeError, match="user_id"):
        codec.encode("credit.grant.requested", record)


def test_unknown_grant_kind_is_refused(codec: AvroCodec) -> None:
    record = dict(EVENTS["credit.grant.requested"], kind="gift")
    with pytest.raises(EncodeError, match="kind"):
        codec.encode("credit.grant.requested", record)


def test_unknown_event_type_names_the_known_ones(codec: AvroCodec) -> None:
    with pytest.raises(UnknownSchemaError, match=r"credit\.charge\.requested"):
        codec.encode("credit.charge.typo", {})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not Avro single-object encoding"),
        (b"{json: true}", "not Avro single-object encoding"),
        (MARKER + b"\x01\x02", "not Avro single-object encoding"),
    ],
)
def test_bad_bytes_are_malformed_with_context(codec: AvroCodec, data: bytes, message: str) -> None:
    with pytest.raises(MalformedMessageError, match=message) as caught:
        codec.decode(data)
    assert caught.value.reason == "malformed"
    assert f"{len(data)} bytes" in str(caught.value)


def test_none_value_is_malformed(codec: AvroCodec) -> None:
    with pytest.raises(MalformedMessageError, match="no value"):
        codec.decode(None)


def test_unknown_fingerprint_is_named(codec: AvroCodec) -> None:
    data = MARKER + bytes.fromhex("0102030405060708") + b"\x00"
    with pytest.raises(UnknownSchemaError, match="0102030405060708") as caught:
        codec.decode(data)
    assert caught.value.reason == "unknown_schema"


def test_truncated_body_is_malformed(codec: AvroCodec) -> None:
    data = bytes.fromhex(EXPECTED_HEX["credit.grant.requested"])[:-5]
    with pytest.raises(MalformedMessageError, match="does not decode"):
        codec.decode(data)


def test_trailing_bytes_are_malformed(codec: AvroCodec) -> None:
    data = bytes.fromhex(EXPECTED_HEX["credit.grant.requested"]) + b"\x00"
    with pytest.raises(MalformedMessageError, match="trailing"):
        codec.decode(data)


def test_expected_type_mismatch_is_refused(codec: AvroCodec) -> None:
    data = bytes.fromhex(EXPECTED_HEX["credit.grant.requested"])
    with pytest.raises(UnknownSchemaError, match=r"expected a credit\.charge\.requested"):
        codec.decode(data, expected="credit.charge.requested")


@pytest.mark.parametrize("event_type", sorted(EXPECTED_HEX))
def test_faust_codec_round_trip(codec: AvroCodec, event_type: str) -> None:
    names = register_faust_codecs(codec)
    assert f"avro:{event_type}" in names
    record: dict[str, Any] = EVENTS[event_type]
    data = codecs.dumps(f"avro:{event_type}", record)
    assert data.hex() == EXPECTED_HEX[event_type]
    assert codecs.loads(f"avro:{event_type}", data) == record


def test_faust_codec_rejects_other_event_types(codec: AvroCodec) -> None:
    register_faust_codecs(codec)
    data = bytes.fromhex(EXPECTED_HEX["credit.grant.requested"])
    with pytest.raises(UnknownSchemaError):
        codecs.loads("avro:credit.charge.requested", data)
