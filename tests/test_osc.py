"""OSC control through literal datagrams: every parameter, alias and /norm address, coercion,
rejections on /sd/error, counters, bundles with future timetags, bursts; then real UDP."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.osc import OscControl, OscServer, StatusPublisher, encode
from bridge.control.status import Status
from bridge.control.wire import decode_reply, typed_args
from bridge.params import BY_NAME, LIVE, Kind, ParamStore

SENDER = ("127.0.0.1", 50001)
STATUS = ("127.0.0.1", 50002)


class Replies:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], tuple[str, int]]] = []

    def __call__(self, datagram: bytes, target: tuple[str, int]) -> None:
        address, args = decode_reply(datagram)
        self.sent.append((address, args, target))

    def errors(self) -> list[list[Any]]:
        return [args for address, args, target in self.sent if address == "/sd/error" and target == SENDER]


def make(allowlist: tuple[str, ...] = ()) -> tuple[OscControl, ParamStore, Replies]:
    store = ParamStore({})
    replies = Replies()
    control = OscControl(store, send=replies, error_targets=[STATUS], allowlist=allowlist)
    return control, store, replies


def pending(store: ParamStore) -> dict[str, Any]:
    return {name: p.value for name, p in store.take_pending().items()}


def literal(address: str, tags: str, *payload: bytes) -> bytes:
    """An OSC message written out by hand (padded strings, big-endian numbers)."""

    def pad(b: bytes) -> bytes:
        b += b"\0"
        return b + b"\0" * (-len(b) % 4)

    return pad(address.encode()) + pad(("," + tags).encode()) + b"".join(payload)


def test_literal_bytes_reach_the_store() -> None:
    control, store, _ = make()
    control.handle_datagram(literal("/sd/seed", "i", struct.pack(">i", 42)), SENDER)
    control.handle_datagram(literal("/sd/guidance", "f", struct.pack(">f", 2.5)), SENDER)
    control.handle_datagram(literal("/sd/prompt", "s", b"a cat\0\0\0"), SENDER)
    control.handle_datagram(literal("/sd/freeze", "T"), SENDER)
    assert pending(store) == {"seed": 42, "guidance": 2.5, "prompt": "a cat", "freeze": True}
    assert control.counters.accepted == 4 and control.counters.rejected == 0


def sample_args(kind: Kind) -> tuple[list[Any], Any]:
    return {
        Kind.STRING: (["neon city"], "neon city"),
        Kind.FLOAT: ([0.5], 0.5),
        Kind.INT: ([3], 3),
        Kind.BOOL: ([True], True),
        Kind.INT_LIST: ([20, 30, 40], (20, 30, 40)),
        Kind.BLEND: (["a", 0.25, "b", 0.75], (("a", 0.25), ("b", 0.75))),
    }[kind]


@pytest.mark.parametrize("name", list(LIVE))
def test_every_live_parameter_and_alias(name: str) -> None:
    param = LIVE[name]
    args, value = sample_args(param.kind)
    for address in (param.address, *param.aliases):
        control, store, replies = make()
        control.handle_datagram(encode(address, args), SENDER)
        assert pending(store) == {name: value}, address
        assert replies.errors() == []


@pytest.mark.parametrize("name", [n for n, p in LIVE.items() if p.numeric])
def test_norm_addresses(name: str) -> None:
    param = LIVE[name]
    assert param.minimum is not None and param.maximum is not None
    control, store, _ = make()
    control.handle_datagram(encode(f"{param.address}/norm", [1.0]), SENDER)
    control.handle_datagram(encode(f"{param.address}/norm", [0.0]), SENDER)
    assert pending(store)[name] == param.minimum
    control.handle_datagram(encode(f"{param.address}/norm", [1.0]), SENDER)
    assert pending(store)[name] == param.maximum


def test_streamdiffusiontd_aliases() -> None:
    control, store, _ = make()
    for address, args in [
        ("/prompt", ["a"]),
        ("/negative_prompt", ["b"]),
        ("/guidance_scale", [1.4]),
        ("/delta", [0.8]),
        ("/seed", [5.0]),  # TouchDesigner: a float for an int
        ("/t_list", [18.0, 36.0]),
    ]:
        control.handle_datagram(encode(address, args), SENDER)
    assert pending(store) == {
        "prompt": "a",
        "negative_prompt": "b",
        "guidance": pytest.approx(1.4),
        "delta": pytest.approx(0.8),
        "seed": 5,
        "t_index_list": (18, 36),
    }


def test_wrong_types_and_ranges_are_reported_on_sd_error() -> None:
    control, store, replies = make()
    control.handle_datagram(encode("/sd/guidance", ["loud"]), SENDER)
    control.handle_datagram(encode("/sd/prompt", [3]), SENDER)
    control.handle_datagram(encode("/sd/t_index_list", [40, 20]), SENDER)
    control.handle_datagram(encode("/sd/cfg_type", ["full"]), SENDER)
    control.handle_datagram(encode("/sd/guidance", [42.0]), SENDER)  # clamped, not rejected
    assert replies.errors() == [
        ["/sd/guidance", "guidance expects a number, got the string 'loud'"],
        ["/sd/prompt", "prompt expects a string, got int 3"],
        ["/sd/t_index_list", "t_index_list must be strictly ascending, got [40, 20]"],
        [
            "/sd/cfg_type",
            "cfg_type is config-only (it changes the UNet batch layout); set it in the config and restart",
        ],
    ]
    # errors also go to the status targets, where TouchDesigner listens
    assert sum(1 for a, _, t in replies.sent if a == "/sd/error" and t == STATUS) == 4
    assert pending(store) == {"guidance": 10.0}
    c = control.counters
    assert (c.rejected, c.clamped, c.accepted) == (4, 1, 1)
    assert control.last_error.startswith("/sd/guidance") or control.last_error.startswith("/sd/cfg_type")


def test_unknown_addresses_and_malformed_packets_are_counted() -> None:
    control, store, replies = make()
    control.handle_datagram(encode("/sd/guidence", [2.0]), SENDER)
    control.handle_datagram(encode("/foo/bar", []), SENDER)
    for junk in (b"", b"garbage", b"/sd/seed\0\0\0\0,i\0\0\0\0", b"#bundle\0\0\0"):
        control.handle_datagram(junk, SENDER)
    c = control.counters
    assert (c.unknown, c.malformed, c.accepted) == (2, 4, 0)
    assert replies.errors()[0] == ["/sd/guidence", "unknown address; did you mean '/sd/guidance'?"]
    assert pending(store) == {}


def bundle(timetag: float, *messages: bytes) -> bytes:
    seconds = int(timetag) + 2208988800  # NTP epoch (1900)
    body = b"".join(struct.pack(">i", len(m)) + m for m in messages)
    return b"#bundle\0" + struct.pack(">II", seconds, 0) + body


def test_bundle_with_future_timetag_is_handled_now() -> None:
    control, store, _ = make()
    an_hour_ahead = time.time() + 3600
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (
            control.handle_datagram(
                bundle(an_hour_ahead, encode("/sd/seed", [11]), encode("/sd/delta", [0.5])), SENDER
            ),
            done.set(),
        )
    )
    worker.start()
    # with strict timing python-osc would sleep an hour in this thread
    assert done.wait(30), "a future timetag stalled the OSC thread"
    assert pending(store) == {"seed": 11, "delta": 0.5}


def test_a_burst_of_1000_messages_keeps_the_latest() -> None:
    control, store, _ = make()
    for i in range(1000):
        control.handle_datagram(encode("/sd/seed", [i]), SENDER)
    assert pending(store) == {"seed": 999}
    assert control.counters.accepted == 1000 and control.counters.messages == 1000


def test_get_replies_to_the_sender() -> None:
    control, store, replies = make()
    store.commit("guidance", 2.0)
    control.handle_datagram(encode("/sd/get", ["guidance", "/sd/t_index_list"]), SENDER)
    control.handle_datagram(encode("/sd/get", ["model"]), SENDER)
    control.handle_datagram(encode("/sd/get", ["nope"]), SENDER)
    got = [(a, args) for a, args, t in replies.sent if t == SENDER]
    assert got[0] == ("/sd/guidance", [2.0])
    assert got[1] == ("/sd/t_index_list", [32, 45])
    assert got[2] == ("/sd/error", ["/sd/get", "model is config-only; it is not readable over OSC"])
    assert got[3][0] == "/sd/error" and "no parameter 'nope'" in got[3][1][1]
    replies.sent.clear()
    control.handle_datagram(encode("/sd/get", []), SENDER)
    assert {a for a, _, _ in replies.sent} == {p.address for p in LIVE.values()}


def test_allowlist_denies_other_senders() -> None:
    control, store, _ = make(allowlist=("10.0.0.5",))
    control.handle_datagram(encode("/sd/seed", [1]), SENDER)
    control.handle_datagram(encode("/sd/seed", [2]), ("10.0.0.5", 9000))
    assert control.counters.denied == 1
    assert pending(store) == {"seed": 2}


def test_handler_bug_does_not_escape() -> None:
    control, store, _ = make()

    def broken(name: str, value: Any) -> int:
        raise RuntimeError("boom")

    store.submit = broken  # type: ignore[method-assign]
    control.handle_datagram(encode("/sd/seed", [1]), SENDER)
    assert control.counters.handler_errors == 1


def test_status_publisher_sends_all_fields_then_changes() -> None:
    sent: list[tuple[str, list[Any]]] = []
    store = ParamStore({})
    status = Status(state="running", fps=12.5, latency_ms=40.0)
    pub = StatusPublisher(
        send=lambda d, t: sent.append(decode_reply(d)), targets=[STATUS], status=lambda: status, store=store
    )
    first = [decode_reply(d) for d in pub.messages(force=True)]
    assert ("/sd/status/state", ["running"]) in first and ("/sd/status/fps", [12.5]) in first
    assert {a for a, _ in first} >= {
        f"/sd/status/{f}" for f in ("fps", "latency_ms", "skip_rate", "state", "dropped")
    }
    store.commit("guidance", 3.0)
    status = Status(state="running", fps=13.0, latency_ms=40.0)
    again = [decode_reply(d) for d in pub.messages(force=False)]
    assert again == [("/sd/status/fps", [13.0]), ("/sd/guidance", [3.0])]


def test_send_types_words_from_the_table() -> None:
    assert typed_args("/sd/prompt", ["neon", "city"]) == ["neon city"]
    assert typed_args("/sd/seed", ["42"]) == [42]
    assert typed_args("/sd/guidance", ["2"]) == [2.0]
    assert typed_args("/t_list", ["20,", "30"]) == [20, 30]
    assert typed_args("/sd/prompt_blend", ["a", "cat:0.7", "|", "dog:0.3"]) == ["a cat", 0.7, "dog", 0.3]
    assert typed_args("/sd/freeze", ["on"]) == [True]
    assert typed_args("/other", ["1", "2.5", "x"]) == [1, 2.5, "x"]


def test_real_udp_round_trip() -> None:
    store = ParamStore({})
    server = OscServer("127.0.0.1", 0)
    control = OscControl(store, send=server.send)
    server.start(control)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(encode("/sd/guidance", ["x"]), server.address)
            data, source = client.recvfrom(65536)
            assert source == server.address
            assert decode_reply(data) == (
                "/sd/error",
                ["/sd/guidance", "guidance expects a number, got the string 'x'"],
            )
            client.sendto(encode("/sd/seed", [77]), server.address)
            client.sendto(encode("/sd/get", ["seed"]), server.address)
            data, _ = client.recvfrom(65536)
            assert decode_reply(data) == ("/sd/seed", [2])  # applied only between frames
        deadline = time.monotonic() + 5
        while (
            "seed" not in (got := {n: p.value for n, p in store.take_pending().items()})
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert got == {"seed": 77}
    finally:
        server.close()
        server.close()  # idempotent


def test_busy_port_error_names_the_fix() -> None:
    first = OscServer("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=r"cannot listen for OSC on 127\.0\.0\.1:\d+: .*--set osc.port="):
            OscServer("127.0.0.1", first.address[1])
    finally:
        first.close()


def test_builder_matches_literal_bytes() -> None:
    b = OscMessageBuilder("/sd/seed")
    b.add_arg(42)
    assert (
        encode("/sd/seed", [42]) == bytes(b.build().dgram) == literal("/sd/seed", "i", struct.pack(">i", 42))
    )
    assert BY_NAME["seed"].address == "/sd/seed"
