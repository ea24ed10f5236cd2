"""OSC control through literal datagrams: every parameter, alias and /norm address, coercion,
rejections on /sd/error, counters, bundles with future timetags, bursts; then real UDP."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from bridge.control.osc import Inbox, OscControl, OscServer, StatusPublisher, encode
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


def messages(datagram: bytes) -> list[tuple[str, list[Any]]]:
    """Every message in a datagram (a plain message or a bundle), as (address, args)."""
    return [(m.message.address, list(m.message.params)) for m in OscPacket(datagram).messages]


def test_get_right_after_a_set_answers_the_new_value_and_says_it_is_pending() -> None:
    store = ParamStore({})
    raw: list[bytes] = []
    control = OscControl(store, send=lambda datagram, target: raw.append(datagram))
    control.handle_datagram(encode("/sd/guidance/norm", [0.3]), SENDER)
    control.handle_datagram(encode("/sd/get", ["guidance", "seed"]), SENDER)
    assert messages(raw[0]) == [("/sd/guidance", [pytest.approx(3.0)]), ("/sd/pending", ["/sd/guidance"])]
    assert messages(raw[1]) == [("/sd/seed", [2])]  # nothing pending: a plain message
    assert decode_reply(raw[0]) == ("/sd/guidance", [pytest.approx(3.0)])  # what plain clients read
    for name, item in store.take_pending().items():  # the runtime applies it between frames
        store.commit(name, item.value)
    raw.clear()
    control.handle_datagram(encode("/sd/get", ["guidance"]), SENDER)
    assert messages(raw[0]) == [("/sd/guidance", [pytest.approx(3.0)])]


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
            # the newest accepted value, marked as not applied yet (no frame ran in between)
            assert messages(data) == [("/sd/seed", [77]), ("/sd/pending", ["/sd/seed"])]
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


def test_unknown_addresses_are_rate_limited_globally(caplog: pytest.LogCaptureFixture) -> None:
    control, _, replies = make()
    caplog.set_level(logging.WARNING, logger="bridge.control.osc")
    for i in range(20_000):
        control.handle_datagram(encode(f"/nosuch/{i}", [1]), SENDER)
    assert control.counters.unknown == 20_000
    lines = [r for r in caplog.records if "unknown address" in r.getMessage()]
    assert 1 <= len(lines) <= 3, len(lines)  # one per 5 s interval, whatever the addresses
    control.handle_datagram(encode("/" + "x" * 10_000, []), SENDER)
    address, _ = replies.errors()[-1]
    assert len(address) < 250 and address.endswith("(10001 characters in all)")


def test_the_inbox_keeps_the_latest_datagram_per_address_in_order_of_last_arrival() -> None:
    inbox = Inbox(frozenset({b"/sd/seed", b"/sd/guidance", b"/sd/guidance/norm"}))
    other = ("127.0.0.1", 50009)
    for datagram, sender in [
        (encode("/sd/guidance", [1.0]), SENDER),
        (encode("/sd/guidance/norm", [0.5]), SENDER),
        (encode("/sd/get", ["seed"]), SENDER),
        (encode("/sd/seed", [1]), other),
        (encode("/sd/guidance", [2.0]), SENDER),  # replaces 1.0, and comes after the /norm
        (encode("/sd/get", ["seed"]), SENDER),  # /sd/get is never merged
        (encode("/sd/seed", [3]), SENDER),  # another sender's seed: both kept
    ]:
        inbox.put(datagram, sender)
    got = [(decode_reply(d), s) for d, s in inbox.take(0)]
    assert got == [
        (("/sd/guidance/norm", [0.5]), SENDER),
        (("/sd/get", ["seed"]), SENDER),
        (("/sd/seed", [1]), other),
        (("/sd/guidance", [2.0]), SENDER),
        (("/sd/get", ["seed"]), SENDER),
        (("/sd/seed", [3]), SENDER),
    ]
    assert inbox.superseded == 1 and inbox.take(0) == []


def test_a_full_inbox_drops_the_oldest_and_counts_it() -> None:
    inbox = Inbox(frozenset(), capacity=3)
    for i in range(5):
        inbox.put(encode("/nosuch", [i]), SENDER)
    assert [decode_reply(d)[1] for d, _ in inbox.take(0)] == [[2], [3], [4]]
    assert inbox.overflowed == 2


BURST_SENDER = """
import socket, struct, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
def message(address, tag, payload):
    pad = lambda b: b + b"\\0" * (4 - len(b) % 4)
    return pad(address.encode()) + pad(("," + tag).encode()) + payload
burst = []
for i in range(n):  # seed 0, 1, 2, ... and guidance 0.00, 0.01, ... interleaved
    burst.append(message("/sd/seed", "i", struct.pack(">i", i)))
    burst.append(message("/sd/guidance", "f", struct.pack(">f", (i % 1000) / 100)))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for datagram in burst:
        sock.sendto(datagram, ("127.0.0.1", port))
"""


def test_a_real_udp_burst_of_20000_changes_ends_on_its_final_values() -> None:
    """Another process (as TouchDesigner is) sends 10,000 seeds and 10,000 guidances as fast as
    it can; the bridge must end on the last of each, however many it parsed on the way."""
    store = ParamStore({})
    server = OscServer("127.0.0.1", 0)
    if server.rcvbuf_bytes < 20_000 * 1024:
        server.close()
        pytest.skip(
            f"the OS gave a {server.rcvbuf_bytes}-byte UDP receive buffer, too small to hold a "
            "20,000-datagram burst if this loaded machine starves the bridge of CPU; raise it with "
            "'sysctl -w net.core.rmem_max=16777216'"
        )
    control = OscControl(store, send=server.send)
    server.start(control)
    try:
        subprocess.run(
            [sys.executable, "-c", BURST_SENDER, str(server.address[1]), "10000"], check=True, timeout=60
        )
        final = {"seed": 9999, "guidance": pytest.approx(9.99)}
        deadline = time.monotonic() + 10
        while {n: store.latest(n) for n in final} != final:
            assert time.monotonic() < deadline, ({n: store.latest(n) for n in final}, control.counters)
            time.sleep(0.01)
    finally:
        server.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux reports its UDP drops")
def test_datagrams_the_kernel_drops_are_counted() -> None:
    store = ParamStore({})
    server = OscServer("127.0.0.1", 0, rcvbuf_bytes=1)  # the smallest buffer the kernel allows
    control = OscControl(store, send=server.send)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(2000):  # nobody reads yet: the buffer fills and the kernel drops
                client.sendto(encode("/sd/seed", [i]), server.address)
            server.start(control)
            deadline = time.monotonic() + 10
            while store.latest("delta") != 0.5 or control.counters.kernel_dropped == 0:
                # carries the drop count; sent again, since the kernel drops it too while the
                # buffer is still full
                client.sendto(encode("/sd/delta", [0.5]), server.address)
                assert time.monotonic() < deadline, control.counters
                time.sleep(0.05)
        assert 0 < control.counters.kernel_dropped < 2000
    finally:
        server.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux reports its UDP drops")
def test_drops_at_the_end_of_a_burst_are_counted_too() -> None:
    """No later datagram carries their count, so it comes from /proc/net/udp."""
    store = ParamStore({})
    server = OscServer("127.0.0.1", 0, rcvbuf_bytes=1)
    control = OscControl(store, send=server.send)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(2000):
                client.sendto(encode("/sd/seed", [i]), server.address)
        server.start(control)
        deadline = time.monotonic() + 10
        while control.counters.kernel_dropped == 0:
            assert time.monotonic() < deadline, control.counters
            time.sleep(0.01)
        assert store.latest("seed") < 1999  # the last ones were the kernel's to drop
    finally:
        server.close()


def test_a_huge_prompt_or_blend_is_refused_on_sd_error_and_loses_nothing() -> None:
    control, store, replies = make()
    control.handle_datagram(encode("/sd/prompt", ["neon city"]), SENDER)
    control.handle_datagram(encode("/sd/prompt", ["x" * 60_000]), SENDER)  # near the UDP limit
    control.handle_datagram(
        encode("/sd/prompt_blend", [x for i in range(1000) for x in (f"p{i}", 1.0)]), SENDER
    )
    control.handle_datagram(encode("/sd/t_index_list", list(range(11))), SENDER)
    errors = replies.errors()
    assert [address for address, _ in errors] == ["/sd/prompt", "/sd/prompt_blend", "/sd/t_index_list"]
    assert errors[0][1].startswith("prompt is 60000 characters long") and len(errors[0][1]) < 400
    assert errors[1][1].startswith("prompt_blend has 1000 entries; the most is 16")
    assert errors[2][1] == "t_index_list expects 1 to 10 ints, got 11"
    assert pending(store) == {"prompt": "neon city"}
