"""OSCQuery: the bridge describes its OSC address space over HTTP, so Chataigne, Vezér and
TouchDesigner's OSCQuery components find every parameter with its type, range and current value
on their own (https://github.com/Vidvox/OSCQueryProposal).

The HTTP side is the standard library's, behind `bridge.webguard` (Host and Origin checks, a
deadline per request, a cap on connections), speaking HTTP/1.1. Live values follow over a
WebSocket on the same port (LISTEN/IGNORE, `bridge.control.oscquery_listen`, needs `websockets`).
The zero-configuration announcement (`_oscjson._tcp` and `_osc._udp` over mDNS) uses `zeroconf`.
Both are in the extra `oscquery`; without them, clients are pointed at http://HOST:PORT by hand
and re-read values themselves.

The tree itself (one TYPE per method, no children under a value, /sd/norm) is built in
`bridge.control.oscquery_tree`; the /sd/norm methods are served once the server is given the
`OscControl`.
"""

from __future__ import annotations

import importlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from bridge.control import oscquery_listen
from bridge.control.osc import OscControl
from bridge.control.oscquery_listen import Listeners
from bridge.control.oscquery_tree import ATTRIBUTES, build_tree, current_values, find, route_norm
from bridge.params import cut
from bridge.webguard import MAX_CONNECTIONS, TIMEOUT_S, GuardedHandler, GuardedServer, Refusal

log = logging.getLogger(__name__)

NOT_ANNOUNCED = (
    'not announced over mDNS: zeroconf is not installed (pip install "streamdiffusion-bridge[oscquery]")'
)


def announced_addresses(host: str, machine: list[str]) -> list[str]:
    """The IPv4 addresses to announce for a server bound to `host`: that address, or for a
    wildcard bind every address of the machine but loopback (other machines cannot use it),
    loopback only when the machine has nothing else."""
    if host not in ("", "0.0.0.0"):
        return [socket.gethostbyname(host)]
    outside = [a for a in machine if not a.startswith("127.")]
    return outside or ["127.0.0.1"]


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def default_name() -> str:
    """ "sdbridge@HOST": several bridges on one network are told apart by their machine."""
    return f"sdbridge@{short_hostname()}"


def responder_interfaces(host: str, addresses: list[str]) -> list[str] | None:
    """The interfaces the mDNS responder joins: those of the announced addresses, so a bridge
    bound to loopback answers on loopback only; None (zeroconf's default, every interface) for
    a wildcard bind."""
    return None if host in ("", "0.0.0.0") else addresses


def numbered_name(name: str, taken: Collection[str]) -> str:
    """`name`, or "name (2)", "name (3)", ... : the first that is not in `taken`."""
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    return candidate


class _Responder:
    """One zeroconf responder per process and set of interfaces, shared by every OSCQuery server
    in the process and closed with the last of them.

    Why shared, and why the name check below: zeroconf's own probe for a clash asks with the
    unicast-response bit set (RFC 6762 section 8.1). Two responders on one machine both bind UDP 5353
    with SO_REUSEPORT, and the kernel hands a unicast reply to only one of those sockets, often
    the asker's own neighbour rather than the asker. So two bridges on one machine kept the same
    name. Names taken in this process are known here for certain; other processes and machines
    are asked with a multicast ("QM") question, whose answer every responder hears."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _shared: ClassVar[dict[tuple[str, ...] | None, _Responder]] = {}
    LOOKUP_TIMEOUT_MS = 500

    def __init__(self, zeroconf: Any, interfaces: list[str] | None) -> None:
        self._module = zeroconf
        self._key = None if interfaces is None else tuple(interfaces)
        self.zc: Any = zeroconf.Zeroconf() if interfaces is None else zeroconf.Zeroconf(interfaces=interfaces)
        self._users = 0
        self._names: set[str] = set()

    @classmethod
    def acquire(cls, zeroconf: Any, interfaces: list[str] | None) -> _Responder:
        key = None if interfaces is None else tuple(interfaces)
        with cls._lock:
            responder = cls._shared.get(key)
            if responder is None:
                responder = cls._shared[key] = cls(zeroconf, interfaces)
            responder._users += 1
            return responder

    def unique_name(self, name: str) -> str:
        """The first of "name", "name (2)", ... that no bridge in this process holds and no
        responder answers for on the network; reserved for the caller."""
        with self._lock:
            while True:
                candidate = numbered_name(name, self._names)
                if not self._answered(candidate):
                    self._names.add(candidate)
                    return candidate
                self._names.add(candidate)  # held elsewhere: skip it from now on

    def _answered(self, instance: str) -> bool:
        kind = "_oscjson._tcp.local."
        question = self._module.DNSQuestionType.QM
        found = self.zc.get_service_info(kind, f"{instance}.{kind}", self.LOOKUP_TIMEOUT_MS, question)
        return found is not None

    def release(self, names: Collection[str]) -> None:
        """Gives back `names` and, with the last user, closes the responder."""
        with self._lock:
            self._names.difference_update(names)
            self._users -= 1
            if self._users == 0:
                self.zc.close()
                del self._shared[self._key]


class OscQueryServer:
    """Serves the namespace on `port` (0 = any free port) in its own thread, and LISTEN clients
    over WebSocket on the same port. `allowed_hosts` are names besides `host` and localhost that
    clients may use (osc.oscquery_allowed_hosts). With `control` (the OSC server's router), the
    /sd/norm methods are routed and listed. `close()` is idempotent."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        osc_port: int,
        values: Callable[[], Mapping[str, Any]],
        status: Callable[[], Mapping[str, Any]],
        name: str = "",
        advertise: bool = True,
        allowed_hosts: Collection[str] = (),
        control: OscControl | None = None,
        timeout_s: float = TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.name = name or default_name()
        self.osc_port = osc_port
        self._values, self._status = values, status
        self._norm = control is not None
        if control is not None:
            route_norm(control)
        self.listeners = Listeners(read=self.current, known=self._is_method)
        server = self

        class Handler(GuardedHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("oscquery: " + format, *args)

        try:
            self._http = GuardedServer(
                (host, port),
                Handler,
                label="OSCQuery",
                allowed_hosts=allowed_hosts,
                setting="osc.oscquery_allowed_hosts",
                timeout_s=timeout_s,
                max_connections=max_connections,
            )
        except OSError as exc:
            raise OSError(
                f"OSCQuery cannot listen on http://{host}:{port}/: {exc.strerror or exc}; set osc.oscquery_port"
            ) from None
        self.port = int(self._http.server_address[1])
        self.host = host
        self._thread = threading.Thread(target=self._http.serve_forever, name="oscquery", daemon=True)
        self._responder: _Responder | None = None
        self._services: list[Any] = []
        if advertise:
            self._advertise()

    def start(self) -> None:
        self._thread.start()
        self.listeners.start()
        log.info("OSCQuery on http://%s:%d/", self.host, self.port)

    def current(self) -> dict[str, list[Any]]:
        """Every method's current VALUE by address."""
        return current_values(self._values(), self._status(), norm=self._norm)

    def tree(self) -> dict[str, Any]:
        return build_tree(self._values(), self._status(), norm=self._norm)

    def _is_method(self, path: str) -> bool:
        return path in self.current()

    def host_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"NAME": self.name, "OSC_PORT": self.osc_port, "OSC_TRANSPORT": "UDP"}
        if self.host not in ("", "0.0.0.0"):
            info["OSC_IP"] = self.host  # the OSC server shares the bind address (osc.host)
        info["EXTENSIONS"] = {
            "ACCESS": True,
            "VALUE": True,
            "RANGE": True,
            "DESCRIPTION": True,
            "TAGS": False,
            "LISTEN": oscquery_listen.available(),  # a WebSocket on this port, when websockets is installed
            "PATH_CHANGED": False,
        }
        return info

    def _answer(self, request: GuardedHandler) -> None:
        if oscquery_listen.is_upgrade(request):
            self.listeners.serve(request)
            return
        url = urlsplit(request.path)
        if url.query == "HOST_INFO":
            self._send(request, 200, self.host_info())
            return
        target = find(self.tree(), url.path)
        if target is None:
            self._send(request, 404, {"error": f"no OSC node at {cut(url.path)}"})
            return
        if not url.query:
            self._send(request, 200, target)
            return
        attribute = url.query.upper()
        if attribute not in ATTRIBUTES:
            known = ", ".join(sorted(ATTRIBUTES | {"HOST_INFO"}))
            request.refuse(Refusal(400, f"unknown OSCQuery query {cut(url.query)!r}; known: {known}"))
            return
        if attribute not in target:
            self._send(request, 204, None)  # the proposal's answer for an attribute a node lacks
            return
        self._send(request, 200, {attribute: target[attribute]})

    @staticmethod
    def _send(request: GuardedHandler, code: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        request.send_response(code)
        if body is not None:
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _advertise(self) -> None:
        try:
            zeroconf = importlib.import_module("zeroconf")
        except ImportError:
            log.info("OSCQuery: %s", NOT_ANNOUNCED)
            return
        try:
            ifaddr = importlib.import_module("ifaddr")  # zeroconf's own dependency
            machine = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4]
            addresses = announced_addresses(self.host, machine)
            self._responder = _Responder.acquire(zeroconf, responder_interfaces(self.host, addresses))
            instance = self._responder.unique_name(self.name)
            for kind, port in (("_oscjson._tcp.local.", self.port), ("_osc._udp.local.", self.osc_port)):
                info = zeroconf.ServiceInfo(
                    kind,
                    f"{instance}.{kind}",
                    addresses=[socket.inet_aton(a) for a in addresses],
                    port=port,
                    server=f"{short_hostname()}.local.",
                )
                # zeroconf's own probe still renames ("NAME-2") on a clash it hears of in time
                self._responder.zc.register_service(info, allow_name_change=True)
                self._services.append(info)
            log.info("OSCQuery announced over mDNS as %r on %s", self.announced_name, ", ".join(addresses))
        except Exception as exc:  # no multicast here: the HTTP side still works
            log.warning("OSCQuery: could not announce over mDNS (%s); clients can still use the address", exc)

    @property
    def announced_name(self) -> str:
        """The instance name clients list ("" when not announced); zeroconf may have renamed it."""
        if not self._services:
            return ""
        return str(self._services[0].name).removesuffix("." + self._services[0].type)

    def close(self) -> None:
        self.listeners.close()
        if self._responder is not None:
            for info in self._services:
                self._responder.zc.unregister_service(info)
            self._responder.release([self.announced_name])
            self._services.clear()
            self._responder = None
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()
