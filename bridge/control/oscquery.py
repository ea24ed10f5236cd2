"""OSCQuery: the bridge describes its OSC address space over HTTP, so Chataigne, Vezér and
TouchDesigner's OSCQuery components find every parameter with its type, range and current value
on their own (https://github.com/Vidvox/OSCQueryProposal).

The HTTP side is the standard library's, behind `bridge.webguard` (Host and Origin checks, a
deadline per request, a cap on connections), speaking HTTP/1.1. Live values follow over a
WebSocket on the same port (LISTEN/IGNORE, `bridge.control.oscquery_listen`, needs `websockets`).
The zero-configuration announcement (`_oscjson._tcp` and `_osc._udp` over mDNS) uses `zeroconf`.
Both are in the extra `oscquery`; without them, clients are pointed at http://HOST:PORT by hand
and re-read values themselves.

The tree follows the proposal: a node with a value is a method and has no children. Every live
parameter is a method at its OSC address with one fixed TYPE (bools "T", lists and blends as one
string in their text form, which OSC accepts too); the 0..1 variants are methods of their own
under /sd/norm (served once the server is given the `OscControl`); the status values are
read-only methods under /sd/status.
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
from bridge.control.osc import OscControl, encode
from bridge.control.oscquery_listen import Listeners
from bridge.params import LIVE, Kind, Param
from bridge.webguard import MAX_CONNECTIONS, TIMEOUT_S, GuardedHandler, GuardedServer, Refusal, cut

log = logging.getLogger(__name__)

READ, WRITE = 1, 2
NORM_ROOT = "/sd/norm"
NOT_ANNOUNCED = (
    'not announced over mDNS: zeroconf is not installed (pip install "streamdiffusion-bridge[oscquery]")'
)
STATUS_TYPES = {
    "state": "s",
    "mode": "s",
    "fps": "f",
    "latency_ms": "f",
    "engine_ms": "f",
    "skip_rate": "f",
    "dropped": "i",
    "frames": "i",
    "error": "s",
}
# the attributes a `?QUERY` may ask for (the proposal's list); anything else is a 400
ATTRIBUTES = frozenset(
    [
        "FULL_PATH",
        "CONTENTS",
        "TYPE",
        "VALUE",
        "RANGE",
        "ACCESS",
        "DESCRIPTION",
        "TAGS",
        "EXTENDED_TYPE",
        "UNIT",
        "CRITICAL",
        "CLIPMODE",
        "OVERLOADS",
    ]
)


def type_tag(param: Param) -> str:
    """The one OSC type of a parameter's address, whatever its current value."""
    if param.kind is Kind.BOOL:
        return "T"  # the proposal's boolean: T and F both say "a bool", VALUE says which
    return {Kind.FLOAT: "f", Kind.INT: "i"}.get(param.kind, "s")


def query_value(param: Param, value: Any) -> list[Any]:
    """A value in its address's type: lists and blends as their text form ("32 45",
    "a cat:0.7 | a dog:0.3"), which `bridge.params.coerce` accepts from OSC as well."""
    if param.kind is Kind.INT_LIST:
        return [" ".join(str(int(v)) for v in value)]
    if param.kind is Kind.BLEND:
        return [" | ".join(f"{text}:{float(weight):g}" for text, weight in value)]
    if param.kind is Kind.BOOL:
        return [bool(value)]
    if param.kind is Kind.FLOAT:
        return [float(value)]
    if param.kind is Kind.INT:
        return [int(value)]
    return [str(value)]


def norm_params() -> list[Param]:
    """The live parameters with a 0..1 variant."""
    return [p for p in LIVE.values() if p.numeric and p.minimum is not None and p.maximum is not None]


def norm_address(param: Param) -> str:
    return f"{NORM_ROOT}/{param.name}"


def _norm(param: Param, value: Any) -> float:
    assert param.minimum is not None and param.maximum is not None  # norm_params() has ranges only
    span = param.maximum - param.minimum
    return (float(value) - param.minimum) / span if span else 0.0


def _description(param: Param) -> str:
    label = str(getattr(param, "label", "") or "")
    return f"{label}: {param.doc}" if label else param.doc


def current_values(
    values: Mapping[str, Any], status: Mapping[str, Any], *, norm: bool
) -> dict[str, list[Any]]:
    """Every method's VALUE by address: what the tree shows and what LISTEN pushes."""
    out: dict[str, list[Any]] = {}
    for param in LIVE.values():
        out[param.address] = query_value(param, values.get(param.name, param.default))
    if norm:
        for param in norm_params():
            out[norm_address(param)] = [_norm(param, values.get(param.name, param.default))]
    for key, tag in STATUS_TYPES.items():
        raw = status.get(key, "" if tag == "s" else 0)
        out[f"/sd/status/{key}"] = [{"s": str, "f": float, "i": int}[tag](raw)]
    return out


def build_tree(values: Mapping[str, Any], status: Mapping[str, Any], *, norm: bool = False) -> dict[str, Any]:
    """The whole OSCQuery namespace as nested nodes; with `norm`, the /sd/norm methods too."""
    root: dict[str, Any] = {"FULL_PATH": "/", "ACCESS": 0, "CONTENTS": {}}
    current = current_values(values, status, norm=norm)

    def node(path: str) -> dict[str, Any]:
        here = root
        parts = path.strip("/").split("/")
        for i, part in enumerate(parts):
            contents = here.setdefault("CONTENTS", {})
            here = contents.setdefault(part, {"FULL_PATH": "/" + "/".join(parts[: i + 1]), "ACCESS": 0})
        return here

    for param in LIVE.values():
        entry = node(param.address)
        entry.update(TYPE=type_tag(param), ACCESS=READ | WRITE, VALUE=current[param.address])
        entry["DESCRIPTION"] = _description(param)
        if param.numeric and param.minimum is not None and param.maximum is not None:
            entry["RANGE"] = [{"MIN": param.minimum, "MAX": param.maximum}]
        if param.choices:
            entry["RANGE"] = [{"VALS": list(param.choices)}]
    if norm:
        node(NORM_ROOT)["DESCRIPTION"] = "each number as 0..1 of its range (faders, MIDI)"
        for param in norm_params():
            entry = node(norm_address(param))
            entry.update(TYPE="f", ACCESS=READ | WRITE, VALUE=current[norm_address(param)])
            entry.update(RANGE=[{"MIN": 0.0, "MAX": 1.0}], DESCRIPTION=f"{param.name} as 0..1 of its range")
    node("/sd/status")["DESCRIPTION"] = "the bridge's state, sent about once a second to osc.status_targets"
    for key, tag in STATUS_TYPES.items():
        address = f"/sd/status/{key}"
        node(address).update(TYPE=tag, ACCESS=READ, VALUE=current[address])
    return root


def find(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    current = tree
    for part in [p for p in path.split("/") if p]:
        current = current.get("CONTENTS", {}).get(part)
        if current is None:
            return None
    return current


def route_norm(control: OscControl) -> None:
    """Make the OSC server take /sd/norm/NAME as it takes /sd/NAME/norm (same coercion, same
    errors, same counters): the 0..1 addresses OSCQuery lists as methods of their own."""
    for param in norm_params():
        served = f"{param.address}/norm"

        def forward(sender: Any, address: str, *args: Any, served: str = served) -> None:
            control.dispatcher.call_handlers_for_packet(encode(served, args), sender)

        control.dispatcher.map(norm_address(param), forward, needs_reply_address=True)


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
