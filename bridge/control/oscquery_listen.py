"""OSCQuery's LISTEN extension: WebSocket clients on the OSCQuery port ask for the addresses
they follow, and each change of a value there is pushed to them as a binary OSC packet.

Per the proposal (https://github.com/Vidvox/OSCQueryProposal, "Bi-directional communication"),
a client sends text messages `{"COMMAND": "LISTEN", "DATA": "/sd/guidance"}` and
`{"COMMAND": "IGNORE", "DATA": "/sd/guidance"}`. The WebSocket protocol itself is `websockets`'
sans-I/O `ServerProtocol` (extra `oscquery`); the bytes move on the HTTP connection's own thread,
which keeps its slot in the server's connection cap while it listens. Idle listeners are never
timed out; a client that stops reading is dropped after the guard's write timeout.
"""

from __future__ import annotations

import importlib
import json
import logging
import select
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from bridge.control.osc import encode
from bridge.params import cut
from bridge.webguard import GuardedHandler, Refusal

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024  # bytes a client may send in one WebSocket message
POLL_S = 0.1  # how often the values are compared for changes while someone listens
MISSING = 'LISTEN needs websockets: pip install "streamdiffusion-bridge[oscquery]"'


def available() -> bool:
    """Whether `websockets` is installed (HOST_INFO advertises LISTEN only then)."""
    try:
        importlib.import_module("websockets.server")
    except ImportError:
        return False
    return True


def is_upgrade(request: GuardedHandler) -> bool:
    return "websocket" in (request.headers.get("Upgrade") or "").lower()


class _Client:
    """One WebSocket connection: the addresses it follows and the packets waiting for it
    (latest per address wins, so a slow client gets the newest values, not a backlog)."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.lock = threading.Lock()
        self.waiting: dict[str, bytes] = {}

    def offer(self, address: str, packet: bytes) -> None:
        with self.lock:
            if address in self.paths:
                self.waiting[address] = packet

    def take(self) -> list[bytes]:
        with self.lock:
            packets, self.waiting = list(self.waiting.values()), {}
            return packets


class Listeners:
    """The LISTEN clients of one OSCQuery server. `read()` gives every address's current OSC
    arguments; `known(path)` says whether the tree has a method there. `start()` runs the thread
    that compares values every `POLL_S` while someone listens; `close()` ends it and every
    client (idempotent)."""

    def __init__(self, *, read: Callable[[], Mapping[str, list[Any]]], known: Callable[[str], bool]) -> None:
        self._read = read
        self._known = known
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._last: dict[str, list[Any]] = {}
        self._thread = threading.Thread(target=self._run, name="oscquery-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._clients)

    # ------------------------------------------------------------ changes out
    def _run(self) -> None:
        while not self._closing.wait(POLL_S):
            with self._lock:
                if not self._clients:
                    continue
                try:
                    self._publish(self._read())
                except Exception:  # a bug in reading values must not end live updates for good
                    log.exception("OSCQuery LISTEN: reading the current values failed")

    def _publish(self, values: Mapping[str, list[Any]]) -> None:
        """Push each value that differs from the last poll to the clients that follow it."""
        for address, args in values.items():
            if self._last.get(address) != args:
                packet = encode(address, args)
                for client in self._clients:
                    client.offer(address, packet)
        self._last = dict(values)

    def _attach(self, client: _Client) -> None:
        with self._lock:
            if not self._clients:  # nobody listened: changes count from now on
                self._last = dict(self._read())
            self._clients.add(client)

    # ------------------------------------------------------------ one client
    def serve(self, request: GuardedHandler) -> None:
        """Upgrade `request`'s connection to a WebSocket and serve it until either side closes.
        Runs on the connection's thread."""
        try:  # a page elsewhere may not listen
            request.server.guard.check_origin(request.headers.get("Origin"), request.headers.get("Host"))
        except Refusal as refusal:
            request.refuse(refusal)
            return
        if not available():
            request.refuse(Refusal(501, MISSING))
            return
        from websockets.http11 import Request
        from websockets.server import ServerProtocol

        request.close_connection = True  # after the WebSocket, the connection is done
        protocol = ServerProtocol(max_size=MAX_MESSAGE, logger=log)
        # the head was parsed already; the protocol reads it again so that it knows it was upgraded
        head = "".join(f"{key}: {value}\r\n" for key, value in request.headers.items())
        protocol.receive_data(f"GET {request.path} HTTP/1.1\r\n{head}\r\n".encode("latin-1", "replace"))
        handshake = [event for event in protocol.events_received() if isinstance(event, Request)]
        if not handshake:
            request.refuse(Refusal(400, f"not a WebSocket handshake: {cut(str(protocol.handshake_exc))}"))
            return
        response = protocol.accept(handshake[0])
        protocol.send_response(response)
        sock: socket.socket = request.connection
        if not self._flush(protocol, sock) or response.status_code != 101:
            return
        client = _Client()
        self._attach(client)
        try:
            self._converse(protocol, sock, client, request.rfile.take_buffered())
        except OSError as exc:
            log.debug("OSCQuery LISTEN client went away: %s", exc)
        finally:
            with self._lock:
                self._clients.discard(client)

    def _converse(self, protocol: Any, sock: socket.socket, client: _Client, early: bytes) -> None:
        from websockets.frames import Opcode

        if early:
            protocol.receive_data(early)
        said_goodbye = False
        while True:
            if self._closing.is_set() and not said_goodbye:
                protocol.send_close(1001, "the bridge is stopping")
                said_goodbye = True
            for event in protocol.events_received():
                if event.opcode is Opcode.TEXT:
                    self._command(client, bytes(event.data).decode("utf-8", "replace"))
                elif event.opcode is Opcode.BINARY:
                    log.debug("OSCQuery LISTEN: ignored a binary message (send OSC to the OSC port)")
            for packet in client.take():
                protocol.send_binary(packet)
            if not self._flush(protocol, sock) or protocol.close_expected():
                return
            if select.select([sock], [], [], POLL_S / 2)[0]:
                data = sock.recv(65536)
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()

    @staticmethod
    def _flush(protocol: Any, sock: socket.socket) -> bool:
        """Send what the protocol has queued; False once it asked to end the stream."""
        for data in protocol.data_to_send():
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return False
            sock.sendall(data)  # the guard's write timeout drops a client that stopped reading
        return True

    def _command(self, client: _Client, text: str) -> None:
        try:
            message = json.loads(text)
            command, path = str(message["COMMAND"]).upper(), str(message["DATA"])
        except (ValueError, KeyError, TypeError):
            log.info(
                'OSCQuery LISTEN: not a command: %r (expected {"COMMAND": "LISTEN", "DATA": path})', cut(text)
            )
            return
        if command == "LISTEN":
            if not self._known(path):
                log.info("OSCQuery LISTEN: no method at %r", cut(path))
                return
            with client.lock:
                client.paths.add(path)
        elif command == "IGNORE":
            with client.lock:
                client.paths.discard(path)
                client.waiting.pop(path, None)
        else:
            log.info("OSCQuery LISTEN: unknown command %r (LISTEN and IGNORE are served)", cut(command))
