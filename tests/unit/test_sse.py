"""SSE framing: what the writer frames, the reader takes back; anything but a data object is None."""

from __future__ import annotations

from kvpilot import sse


def test_an_event_round_trips_and_names_go_on_their_own_line() -> None:
    body = {"choices": [{"text": "é \n x"}], "n": 1}
    assert sse.event(body) == b'data: {"choices":[{"text":"\\u00e9 \\n x"}],"n":1}\n\n'
    assert sse.payload(sse.event(body)) == body
    named = sse.event({"a": 1}, "kvpilot.migrated")
    assert named == b'event: kvpilot.migrated\ndata: {"a":1}\n\n'


def test_payload_is_none_for_done_named_broken_or_non_object_events() -> None:
    for event in (sse.DONE, sse.event({"a": 1}, "x"), b"data: {broken\n\n", b": comment\n\n", b"data: [1]\n\n"):
        assert sse.payload(event) is None
