"""OSC control: routing from datagrams to the parameter store, replies, counters, status out.

`OscControl` takes bytes and a sender address and never sees a socket, so tests feed it literal
datagrams. `OscServer` is the thin shell: a receive thread that only drains the UDP socket into
an `Inbox` (a newer datagram to the same parameter address replaces the older one, so a burst
costs the parser one message per address, and its last value always wins), and a parse thread
that hands what waits there to the `OscControl`. `StatusPublisher` sends `/sd/status/*` and
changed parameter values to the configured targets.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket, ParseError

from bridge.control.status import RateLimitedLog, Status
from bridge.params import (
    BY_NAME,
    LIVE,
    Coerced,
    Param,
    ParamError,
    ParamStore,
    coerce,
    coerce_norm,
    cut,
    osc_args,
    shown,
)

log = logging.getLogger(__name__)

Address = tuple[str, int]
SendFn = Callable[[bytes, Address], None]

ERROR_ADDRESS = "/sd/error"
GET_ADDRESS = "/sd/get"
# A /sd/get reply whose value was accepted but not applied yet comes as a bundle: the value's
# message first (what a plain client reads), then `/sd/pending <address>`.
PENDING_ADDRESS = "/sd/pending"

# Asked of the OS for the socket's receive buffer. Linux gives twice the number (its bookkeeping
# counts ~830 bytes per small datagram, so 2 x 16 MB hold a 20,000-message burst even while the
# bridge is starved of CPU) and caps a plain request at net.core.rmem_max; SO_RCVBUFFORCE
# (Linux's value 33, with CAP_NET_ADMIN) goes past the cap.
RCVBUF_BYTES = 16 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
DROPS_EVERY_S = 1.0  # how often /proc/net/udp is read for drops no later datagram reported
INBOX_DATAGRAMS = 4096  # most datagrams waiting for the parse thread; the oldest go first
# Linux's SO_RXQ_OVFL (include/uapi/asm-generic/socket.h): recvmsg then carries, as ancillary
# data, a uint32 count of datagrams the kernel dropped on this socket for a full buffer.
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)


def encode(address: str, args: Sequence[Any] = ()) -> bytes:
    """One OSC message as a datagram."""
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return bytes(builder.build().dgram)


def encode_bundle(datagrams: Sequence[bytes]) -> bytes:
    """OSC messages (as datagrams) in one bundle, timetag "immediately"."""
    builder = OscBundleBuilder(IMMEDIATELY)
    for datagram in datagrams:
        builder.add_content(OscMessage(datagram))
    return bytes(builder.build().dgram)


def parse_target(text: str) -> Address:
    """'host:port' -> (host, port), with a message naming the value when it is not that."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:7001), got {text!r}")
    return host, int(port)


@dataclass
class OscCounters:
    """Everything the server saw, by outcome. Read by status and tests."""

    packets: int = 0
    messages: int = 0
    accepted: int = 0  # values queued for the next frame (clamped ones included)
    clamped: int = 0
    rejected: int = 0  # wrong type, wrong count, config-only, ...
    malformed: int = 0  # datagrams that are not OSC
    unknown: int = 0  # messages to addresses we do not serve
    denied: int = 0  # datagrams from senders outside the allowlist
    handler_errors: int = 0  # bugs: a handler raised; the server thread carries on
    # set by OscServer (tests feeding handle_datagram leave them at 0):
    superseded: int = 0  # replaced before parsing by a newer datagram to the same address
    overflowed: int = 0  # dropped from a full inbox (INBOX_DATAGRAMS), the oldest first
    kernel_dropped: int = 0  # dropped by the OS for a full socket buffer (Linux reports it)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class OscControl:
    """Routes OSC messages to the parameter store and answers on `/sd/error` and `/sd/get`.

    Call `handle_datagram` from one thread (the server's). `send(datagram, address)` delivers
    replies; errors go to the sender and to `error_targets`.
    """

    def __init__(
        self,
        store: ParamStore,
        *,
        send: SendFn,
        error_targets: Sequence[Address] = (),
        allowlist: Sequence[str] = (),
        on_submit: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.counters = OscCounters()
        self.last_error = ""
        self._send = send
        self._error_targets = tuple(error_targets)
        self._allowlist = frozenset(allowlist)
        self._on_submit = on_submit
        self._log = RateLimitedLog(log)
        self._addresses: list[str] = []
        # strict_timing=False: a bundle with a future timetag (TouchDesigner sends them) is handled
        # now; with strict timing python-osc would sleep in this thread until the timetag.
        self.dispatcher = Dispatcher(strict_timing=False)
        for param in BY_NAME.values():
            self._route(param.address, self._setter(param, coerce))
            if param.live:
                for alias in param.aliases:
                    self._route(alias, self._setter(param, coerce))
                if param.numeric:
                    self._route(f"{param.address}/norm", self._setter(param, coerce_norm))
        self._route(GET_ADDRESS, self._get)
        self._roots = frozenset(a.split("/", 2)[1] for a in self._addresses)
        self.dispatcher.set_default_handler(self._unknown, needs_reply_address=True)

    @property
    def addresses(self) -> list[str]:
        """Every address served, canonical ones first."""
        return list(self._addresses)

    def _route(self, address: str, handler: Callable[..., None]) -> None:
        def guarded(sender: Address, addr: str, *args: Any) -> None:
            self.counters.messages += 1
            try:
                handler(sender, addr, args)
            except Exception:  # a bug must not take the control thread down with it
                self.counters.handler_errors += 1
                log.exception("OSC handler for %s failed on %r", addr, args)

        self._addresses.append(address)
        self.dispatcher.map(address, guarded, needs_reply_address=True)

    # ------------------------------------------------------------------ input
    def handle_datagram(self, data: bytes, sender: Address) -> None:
        """Parse one UDP datagram and act on every message in it."""
        self.counters.packets += 1
        if self._allowlist and sender[0] not in self._allowlist:
            self.counters.denied += 1
            self._log.warning("denied", f"OSC from {sender[0]} ignored: not in osc.allowlist")
            return
        try:
            OscPacket(data)  # python-osc drops unparsable packets silently; count and report them
        except ParseError as exc:
            self.counters.malformed += 1
            self._log.warning(
                "malformed", f"malformed OSC packet from {sender[0]}:{sender[1]} ({len(data)} bytes): {exc}"
            )
            return
        self.dispatcher.call_handlers_for_packet(data, sender)

    def _setter(
        self, param: Param, convert: Callable[[Param, Sequence[Any]], Coerced]
    ) -> Callable[..., None]:
        def handle(sender: Address, address: str, args: tuple[Any, ...]) -> None:
            try:
                coerced = convert(param, args)
            except ParamError as exc:
                self.reject(address, str(exc), sender)
                return
            if coerced.warning:
                self.counters.clamped += 1
                self._log.warning(f"clamp:{param.name}", f"OSC {address}: {coerced.warning}")
            self.store.submit(param.name, coerced.value)
            self.counters.accepted += 1
            if self._on_submit is not None:
                self._on_submit()

        return handle

    def _get(self, sender: Address, address: str, args: tuple[Any, ...]) -> None:
        names = [str(a) for a in args] or list(LIVE)
        for raw in names:
            name = raw.removeprefix("/sd/")
            param = BY_NAME.get(name)
            if param is None:
                hint = _suggest(name, list(BY_NAME)) if len(name) <= 64 else ""
                self.reject(address, f"no parameter {shown(raw)}{hint}", sender)
            elif not param.live:
                self.reject(address, f"{name} is config-only; it is not readable over OSC", sender)
            else:
                # the newest accepted value, also before the engine's next frame has applied it
                value, pending = self.store.newest(name)
                reply = encode(param.address, osc_args(param, value))
                if pending:
                    reply = encode_bundle([reply, encode(PENDING_ADDRESS, [param.address])])
                self._send(reply, sender)

    def _unknown(self, sender: Address, address: str, *args: Any) -> None:
        self.counters.messages += 1
        self.counters.unknown += 1
        hint = self._hint(address)
        # one key for every unknown address: a flood of distinct ones is one line per interval,
        # and the limiter's table stays one entry
        self._log.warning("unknown", f"OSC to unknown address {shown(address)}{hint}")
        self._reply_error(address, f"unknown address{hint}", sender)

    def _hint(self, address: str) -> str:
        """'; did you mean ...?' for a likely typo: a short address under a root we serve (/sd/,
        /prompt, ...). Matching costs about half a millisecond, so a flood of made-up addresses
        elsewhere skips it."""
        root = address.split("/", 2)[1] if address.count("/") else ""
        if len(address) > 64 or root not in self._roots:
            return ""
        return _suggest(address, self._addresses)

    def note_kernel_drops(self, total: int) -> None:
        """Record the OS's count of datagrams it dropped for a full buffer (from the server)."""
        new = total - self.counters.kernel_dropped
        self.counters.kernel_dropped = total
        self._log.warning(
            "kernel_dropped",
            f"OSC: the OS dropped {new} datagram(s) for a full receive buffer ({total} in all); "
            "the sender outpaces the bridge",
        )

    def reject(self, address: str, reason: str, sender: Address | None) -> None:
        """Count, log and report a refused message on /sd/error."""
        self.counters.rejected += 1
        self._log.warning(f"reject:{address}", f"OSC {address} rejected: {reason}")
        self._reply_error(address, reason, sender)

    def _reply_error(self, address: str, reason: str, sender: Address | None) -> None:
        address = cut(address)
        self.last_error = f"{address}: {reason}"
        datagram = encode(ERROR_ADDRESS, [address, reason])
        targets = {*self._error_targets, *([sender] if sender else [])}
        for target in targets:
            self._send(datagram, target)


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class Inbox:
    """Datagrams between the receive thread and the parse thread, latest wins per address.

    A datagram holding one message to a parameter address replaces the one still waiting from
    the same sender to the same address (`superseded`), and takes its place at the end, so the
    parse order stays the order of last arrival and a burst's final value is parsed last.
    Anything else (bundles, /sd/get, unknown addresses, junk) waits in arrival order. At most
    `capacity` datagrams wait; beyond that the oldest is dropped (`overflowed`).
    """

    def __init__(self, coalesce: frozenset[bytes], *, capacity: int = INBOX_DATAGRAMS) -> None:
        self._coalesce = coalesce
        self._capacity = capacity
        self._items: dict[Hashable, tuple[bytes, Address]] = {}
        self._arrivals = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.superseded = 0
        self.overflowed = 0

    def put(self, data: bytes, sender: Address) -> None:
        end = data.find(b"\0")
        address = data[:end] if end > 0 else b""
        with self._lock:
            key: Hashable
            if address in self._coalesce:
                key = (sender, address)
                if self._items.pop(key, None) is not None:
                    self.superseded += 1
            else:
                self._arrivals += 1
                key = self._arrivals
            self._items[key] = (data, sender)
            if len(self._items) > self._capacity:
                del self._items[next(iter(self._items))]
                self.overflowed += 1
        self._ready.set()

    def take(self, timeout_s: float) -> list[tuple[bytes, Address]]:
        """Everything waiting, in order; waits up to `timeout_s` when nothing is."""
        self._ready.wait(timeout_s)
        with self._lock:
            self._ready.clear()
            items, self._items = list(self._items.values()), {}
        return items


class OscServer:
    """A UDP socket drained by a receive thread into an `Inbox`, and a parse thread feeding an
    `OscControl`; replies leave from the same socket.

    `start()` once; `close()` stops both threads and releases the port (idempotent, any thread).
    The receive thread does nothing but `recvmsg` and a dictionary store, so it keeps the
    socket buffer from filling while the parser works through a burst; the buffer is asked to
    be `rcvbuf_bytes` large, and on Linux the kernel's own drops are counted.
    """

    def __init__(self, host: str, port: int, *, rcvbuf_bytes: int = RCVBUF_BYTES) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rcvbuf_bytes = _ask_rcvbuf(self._sock, rcvbuf_bytes)
        self._counts_drops = _ask_drop_count(self._sock)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise OSError(
                f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}. Is another bridge "
                "running? Pick another port with --set osc.port=..."
            ) from exc
        self._sock.settimeout(0.1)  # how often the receive thread looks at the stop flag
        self.address: Address = self._sock.getsockname()
        self.kernel_dropped = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def send(self, datagram: bytes, target: Address) -> None:
        """Send a datagram; a failed send is logged, never raised into the caller's loop."""
        try:
            self._sock.sendto(datagram, target)
        except OSError as exc:
            log.debug("OSC send to %s failed: %s", target, exc)

    def start(self, control: OscControl) -> None:
        coalesce = frozenset(a.encode() for a in control.addresses if a != GET_ADDRESS)
        inbox = Inbox(coalesce)

        def receive() -> None:
            while not self._stop.is_set():
                try:
                    if self._counts_drops:
                        data, cmsgs, _flags, sender = self._sock.recvmsg(65536, socket.CMSG_SPACE(4))
                    else:  # no drop count to read (and Windows has no recvmsg)
                        (data, sender), cmsgs = self._sock.recvfrom(65536), []
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    continue  # e.g. ICMP port unreachable surfacing on Windows
                for level, kind, payload in cmsgs:
                    if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(payload) >= 4:
                        # the socket's drops since it opened, as of this datagram
                        self.kernel_dropped = max(self.kernel_dropped, struct.unpack("=I", payload[:4])[0])
                inbox.put(data, sender)

        def parse() -> None:
            counters = control.counters
            next_look = 0.0
            while not self._stop.is_set():
                for data, sender in inbox.take(0.1):
                    control.handle_datagram(data, sender)
                counters.superseded, counters.overflowed = inbox.superseded, inbox.overflowed
                if self._counts_drops and time.monotonic() >= next_look:
                    # drops at the end of a burst: no later datagram carries their count
                    next_look = time.monotonic() + DROPS_EVERY_S
                    self.kernel_dropped = max(self.kernel_dropped, proc_udp_drops(self._sock) or 0)
                if self.kernel_dropped != counters.kernel_dropped:
                    control.note_kernel_drops(self.kernel_dropped)

        for name, target in (("osc-receive", receive), ("osc-parse", parse)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._sock.close()


def _ask_rcvbuf(sock: socket.socket, wanted: int) -> int:
    """Ask for a `wanted`-byte receive buffer; returns what the OS gave (Linux reports double
    the usable size and caps a plain request at net.core.rmem_max)."""
    size = wanted
    while True:  # macOS refuses (ENOBUFS) past kern.ipc.maxsockbuf rather than capping: halve
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            break
        except OSError as exc:
            if size <= 1 << 18:
                log.info("OSC: the OS refused a %d-byte receive buffer: %s", size, exc)
                break
            size //= 2
    got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    if got < wanted and SO_RCVBUFFORCE is not None:  # allowed past rmem_max with CAP_NET_ADMIN only
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
            got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        except OSError:
            pass
    if got < wanted:
        log.info(
            "OSC receive buffer is %d bytes (asked for %d); on Linux raise the cap with "
            "'sysctl -w net.core.rmem_max=%d' for long bursts",
            got,
            wanted,
            wanted,
        )
    return got


def proc_udp_drops(sock: socket.socket) -> int | None:
    """The kernel's drop count for `sock` from /proc/net/udp (Linux: the last column, `drops`,
    of the row whose inode is the socket's); None where there is no such file or row."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    try:
        with open("/proc/net/udp", encoding="ascii") as table:
            for line in table:
                cols = line.split()
                if len(cols) >= 13 and cols[9] == inode:
                    return int(cols[12])
    except (OSError, ValueError):
        return None
    return None


def _ask_drop_count(sock: socket.socket) -> bool:
    """Turn on the kernel's drop count (Linux); False where the OS has none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    except OSError as exc:
        log.debug("OSC: no kernel drop count here: %s", exc)
        return False
    return True


class StatusPublisher:
    """Sends `/sd/status/*` (about once per `interval_s`) and changed parameter values (as soon
    as `poke()` is called after a change) to every target. Runs its own thread until `close()`."""

    def __init__(
        self,
        *,
        send: SendFn,
        targets: Sequence[Address],
        status: Callable[[], Status],
        store: ParamStore,
        interval_s: float = 1.0,
    ) -> None:
        self._send = send
        self._targets = tuple(targets)
        self._status = status
        self._store = store
        self._interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="osc-status", daemon=True)
        self._last: Status | None = None

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def messages(self, *, force: bool) -> list[bytes]:
        """The datagrams due now: every status field when `force`, else the changed ones."""
        status = self._status()
        out = []
        for f in fields(Status):
            value = getattr(status, f.name)
            if force or self._last is None or getattr(self._last, f.name) != value:
                out.append(
                    encode(f"/sd/status/{f.name}", [round(value, 3) if isinstance(value, float) else value])
                )
        self._last = status
        for name, value in self._store.take_changed().items():
            out.append(encode(BY_NAME[name].address, osc_args(BY_NAME[name], value)))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            woke = self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            for datagram in self.messages(force=not woke):
                for target in self._targets:
                    self._send(datagram, target)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
