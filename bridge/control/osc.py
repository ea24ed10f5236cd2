"""OSC control: routing from datagrams to the parameter store, replies, counters, status out.

`OscControl` takes bytes and a sender address and never sees a socket, so tests feed it literal
datagrams. `OscServer` is the thin shell: one thread reading a UDP socket. `StatusPublisher`
sends `/sd/status/*` and changed parameter values to the configured targets.
"""

from __future__ import annotations

import difflib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket, ParseError

from bridge.control.status import RateLimitedLog, Status
from bridge.params import BY_NAME, LIVE, Coerced, Param, ParamError, ParamStore, coerce, coerce_norm, osc_args

log = logging.getLogger(__name__)

Address = tuple[str, int]
SendFn = Callable[[bytes, Address], None]

ERROR_ADDRESS = "/sd/error"
GET_ADDRESS = "/sd/get"


def encode(address: str, args: Sequence[Any] = ()) -> bytes:
    """One OSC message as a datagram."""
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
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
                self.reject(address, f"no parameter {raw!r}{_suggest(name, list(BY_NAME))}", sender)
            elif not param.live:
                self.reject(address, f"{name} is config-only; it is not readable over OSC", sender)
            else:
                self._send(encode(param.address, osc_args(param, self.store.get(name))), sender)

    def _unknown(self, sender: Address, address: str, *args: Any) -> None:
        self.counters.messages += 1
        self.counters.unknown += 1
        hint = _suggest(address, self._addresses)
        self._log.warning(f"unknown:{address}", f"OSC to unknown address {address!r}{hint}")
        self._reply_error(address, f"unknown address{hint}", sender)

    def reject(self, address: str, reason: str, sender: Address | None) -> None:
        """Count, log and report a refused message on /sd/error."""
        self.counters.rejected += 1
        self._log.warning(f"reject:{address}", f"OSC {address} rejected: {reason}")
        self._reply_error(address, reason, sender)

    def _reply_error(self, address: str, reason: str, sender: Address | None) -> None:
        self.last_error = f"{address}: {reason}"
        datagram = encode(ERROR_ADDRESS, [address, reason])
        targets = {*self._error_targets, *([sender] if sender else [])}
        for target in targets:
            self._send(datagram, target)


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class OscServer:
    """One thread reading UDP datagrams into an `OscControl`; replies leave from the same socket.

    `start()` once; `close()` stops the thread and releases the port (idempotent, any thread).
    """

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise OSError(
                f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}. Is another bridge "
                "running? Pick another port with --set osc.port=..."
            ) from exc
        self._sock.settimeout(0.1)  # how often the thread looks at the stop flag
        self.address: Address = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, datagram: bytes, target: Address) -> None:
        """Send a datagram; a failed send is logged, never raised into the caller's loop."""
        try:
            self._sock.sendto(datagram, target)
        except OSError as exc:
            log.debug("OSC send to %s failed: %s", target, exc)

    def start(self, control: OscControl) -> None:
        def serve() -> None:
            while not self._stop.is_set():
                try:
                    data, sender = self._sock.recvfrom(65536)
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    continue  # e.g. ICMP port unreachable surfacing on Windows
                control.handle_datagram(data, sender)

        self._thread = threading.Thread(target=serve, name="osc-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self._sock.close()


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
