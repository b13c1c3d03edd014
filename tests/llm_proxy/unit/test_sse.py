"""The SSE framer against the WHATWG event-stream rules, fed chunks split anywhere."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.sse import Comment, Event, Item, SSEDecoder


def decode(chunks: list[bytes]) -> list[Item]:
    decoder = SSEDecoder()
    out: list[Item] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out + decoder.close()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    return [*pieces, data[start:]]


def test_line_ends_comments_fields_and_multiline_data() -> None:
    stream = (b": keep-alive\r\n\r\n"
              b"event: delta\rid: 7\rretry: 150\rdata: {\"a\":\rdata:1}\r\r"
              b"data:no space\n\n"
              b"data\n\n"  # a field without a colon: empty data line
              b"unknown: x\n\n"  # no data: not dispatched
              b"data: last, unterminated")  # fmt: skip
    assert decode([stream]) == [
        Comment(" keep-alive"),
        Event('{"a":\n1}', "delta", "7", 150),
        Event("no space"),
        Event(""),
        Event("last, unterminated"),
    ]


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    assert decode([b"data: x\r", b"\n\r", b"\ndata: y\r\n\r\n"]) == [Event("x"), Event("y")]


def test_encode_round_trips() -> None:
    events: list[Item] = [Event("a\nb", "e", "1", 5), Event("plain"), Comment("ping")]
    wire = b"".join(e.encode() for e in events)
    assert decode([wire]) == events


EVENT = st.builds(
    Event,
    st.lists(st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=8),
             min_size=1, max_size=3).map("\n".join),
    st.none() | st.text(st.characters(blacklist_characters="\r\n\x00", codec="utf-8"),
                        max_size=5),
)  # fmt: skip


@given(events=st.lists(EVENT, max_size=8), ending=st.sampled_from([b"\n", b"\r", b"\r\n"]),
       cuts=st.lists(st.integers(min_value=0), max_size=12))  # fmt: skip
def test_any_split_of_any_framing_gives_the_same_events(
    events: list[Event], ending: bytes, cuts: list[int]
) -> None:
    wire = b"".join(e.encode() for e in events).replace(b"\n", ending)
    assert decode(split(wire, cuts)) == events
    # The last event without its terminating blank line is still delivered.
    if events:
        assert decode(split(wire[: -len(ending)], cuts)) == events
