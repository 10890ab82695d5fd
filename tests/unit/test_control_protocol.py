"""The control protocol: requests are parsed or refused with a one-line
reason and a code, replies of any size survive fragmentation, and nothing
a client can send makes the parser raise anything else."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcpd_py.control import (
    MAX_DATAGRAM,
    MAX_FRAGMENTS,
    MAX_REQUEST,
    PROTOCOL_VERSION,
    Peer,
    ProtocolError,
    Reassembler,
    encode_event,
    encode_reply,
    encode_request,
    may_change,
    parse_message,
    parse_request,
)


def refused(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(data)
    assert "\n" not in info.value.message
    return info.value


def test_a_well_formed_request_is_parsed() -> None:
    request = parse_request(encode_request("status", 7))
    assert (request.id, request.command, dict(request.args)) == (7, "status", {})
    with_args = parse_request(b'{"version": 1, "id": 0, "command": "x", "args": {"a": 1}}')
    assert with_args.args == {"a": 1}


@pytest.mark.parametrize(("data", "code", "words"), [
    (b"\xff\xfe", "malformed", "not UTF-8"),
    (b"", "malformed", "not JSON"),
    (b'{"version": 1, "command": "status"', "malformed", "not JSON"),  # truncated
    (b"[" * 60000, "malformed", "not JSON"),  # nested too deeply
    (b'{"version": 1, "id": ' + b"9" * 5000 + b', "command": "status"}', "malformed",
     "not JSON"),
    (b'["status"]', "malformed", "JSON object"),
    (b'{"id": 3, "command": "status"}', "malformed", "version missing"),
    (b'{"version": "1", "id": 3, "command": "status"}', "malformed", "integer"),
    (b'{"version": true, "id": 3, "command": "status"}', "malformed", "integer"),
    (b'{"version": 2, "id": 3, "command": "status"}', "unsupported_version", "version 2"),
    (b'{"version": 0, "id": 3, "command": "status"}', "unsupported_version", "version 0"),
    (b'{"version": 1, "id": 3}', "malformed", "command missing"),
    (b'{"version": 1, "id": 3, "command": 5}', "malformed", "command missing"),
    (b'{"version": 1, "id": 3, "command": "status", "args": []}', "malformed", "args"),
    (b'{"version": 1, "id": 3, "command": "status", "sudo": true}', "malformed", "'sudo'"),
    (b'{"version": 1, "id": -1, "command": "status"}', "malformed", "id must be"),
    (b'{"version": 1, "id": 1.5, "command": "status"}', "malformed", "id must be"),
])
def test_bad_requests_are_refused_with_a_code_and_one_line(data: bytes, code: str,
                                                           words: str) -> None:
    error = refused(data)
    assert error.code == code
    assert words in error.message


def test_the_request_id_is_echoed_when_it_could_be_read() -> None:
    assert refused(b'{"version": 9, "id": 41, "command": "status"}').request_id == 41
    assert refused(b'{"version": 1, "id": 42}').request_id == 42
    assert refused(b'{"version": 1, "id": "x", "command": "status"}').request_id is None


def test_an_oversized_request_is_refused_before_it_is_read() -> None:
    body = json.dumps({"version": 1, "id": 1, "command": "status",
                       "args": {"pad": "x" * MAX_REQUEST}}).encode()
    assert refused(body).code == "oversized"


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_a_protocol_error(data: bytes) -> None:
    try:
        parse_request(data)
    except ProtocolError as exc:
        assert exc.code in ("malformed", "unsupported_version", "oversized")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "id", "command", "args", "extra"]), JSON))
def test_random_json_objects_are_parsed_or_refused_cleanly(message: dict) -> None:
    try:
        request = parse_request(json.dumps(message).encode())
    except ProtocolError as exc:
        assert exc.message and "\n" not in exc.message
        return
    assert message["version"] == PROTOCOL_VERSION and isinstance(request.command, str)


def test_a_large_reply_is_fragmented_and_reassembled_in_any_order() -> None:
    rows = [{"address": f"192.0.2.{i % 250}", "why": 'quotes " and \\ backslashes ' * 3,
             "n": i} for i in range(20000)]
    datagrams = encode_reply(5, {"rows": rows})
    assert len(datagrams) > 10
    assert all(len(d) <= MAX_DATAGRAM for d in datagrams)
    random.Random(1).shuffle(datagrams)
    reassembler = Reassembler()
    replies = [reassembler.feed(parse_message(d)) for d in datagrams]
    complete = [r for r in replies if r is not None]
    assert len(complete) == 1 and replies[-1] is not None
    assert complete[0]["ok"] is True and complete[0]["result"]["rows"] == rows


def test_a_small_reply_is_one_datagram() -> None:
    (datagram,) = encode_reply(3, {"a": 1})
    assert json.loads(datagram) == {"version": 1, "id": 3, "ok": True, "result": {"a": 1}}


def test_error_replies_carry_code_and_message() -> None:
    (datagram,) = encode_reply(4, error=ProtocolError("unknown_command", "unknown command 'x'"))
    assert json.loads(datagram)["error"] == {"code": "unknown_command",
                                             "message": "unknown command 'x'"}


@pytest.mark.parametrize("fragment", [
    {"fragment": 3, "fragments": 2, "data": ""},
    {"fragment": 0, "fragments": MAX_FRAGMENTS + 1, "data": ""},
    {"fragment": "0", "fragments": 2, "data": ""},
    {"fragment": 0, "fragments": 2, "data": 5},
])
def test_the_client_refuses_bad_fragments(fragment: dict) -> None:
    with pytest.raises(ProtocolError):
        Reassembler().feed({"version": 1, "id": 1, **fragment})


def test_fragments_disagreeing_on_their_count_are_refused() -> None:
    reassembler = Reassembler()
    assert reassembler.feed({"version": 1, "id": 1, "fragment": 0, "fragments": 3,
                             "data": "{"}) is None
    with pytest.raises(ProtocolError):
        reassembler.feed({"version": 1, "id": 1, "fragment": 1, "fragments": 2, "data": "}"})


def test_a_message_of_another_protocol_version_is_refused_by_the_client() -> None:
    with pytest.raises(ProtocolError, match="version 2"):
        parse_message(b'{"version": 2, "id": 1, "ok": true}')


def test_an_event_always_fits_one_datagram() -> None:
    huge = {"time": 1.0, "kind": "plugin", "error": "x" * 200_000}
    data = encode_event(1, huge)
    assert len(data) <= MAX_DATAGRAM
    assert json.loads(data)["event"]["kind"] == "plugin"
    many = {"time": 1.0, "kind": "odd", **{f"k{i}": "y" * 1999 for i in range(100)}}
    assert len(encode_event(1, many)) <= MAX_DATAGRAM


def test_only_root_and_the_control_group_may_change_things() -> None:
    assert may_change(Peer("a", 1, 0, 0), None)
    assert not may_change(Peer("a", 1, 1000, 1000), None)
    assert may_change(Peer("a", 1, 1000, 4242), 4242)  # primary group
    assert not may_change(Peer("a", 1, 1000, 1000), 4242)
    assert not may_change(Peer("a", -1, -1, -1), 4242)  # no credentials: no changes
