"""OSCQuery: an HTTP client reads the advertised tree of a running bridge and finds every live
parameter with its type, range and current value; HOST_INFO, single attributes, unknown paths."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from bridge.control.oscquery import (
    OscQueryServer,
    announced_addresses,
    numbered_name,
    responder_interfaces,
)
from bridge.control.oscquery_tree import build_tree, find
from bridge.params import LIVE, Kind, ParamStore, coerce
from bridge.runtime import in_background
from tests.conftest import tiny_bridge


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = reply.read()
            return reply.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_running_bridge_describes_every_parameter(tiny_pipe: Any) -> None:
    osc_port, query_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    overrides = [
        f"osc.port={osc_port}",
        f"osc.oscquery_port={query_port}",
        "osc.oscquery_advertise=false",  # mDNS has its own test below
        "osc.status_targets=[]",
    ]
    bridge = tiny_bridge(tiny_pipe, [*overrides, "params.guidance=2.5"])
    with in_background(bridge, start_timeout_s=120):
        base = f"http://127.0.0.1:{query_port}"
        code, tree = get(base + "/")
        assert code == 200 and tree["FULL_PATH"] == "/"
        # the runtime hands its OSC router over, so the 0..1 methods are listed
        assert find(tree, "/sd/norm/guidance")["VALUE"] == [pytest.approx(0.25)]
        assert find(tree, "/sd/status/dropped_at")["TYPE"] == "s"  # every Status field is a node
        for param in LIVE.values():
            node = find(tree, param.address)
            assert node is not None, param.address
            assert node["FULL_PATH"] == param.address and node["ACCESS"] == 3
            assert param.doc in node["DESCRIPTION"]
            assert (
                "CONTENTS" not in node
            )  # a method has no children (the proposal; python-oscquery refuses it)
            if param.numeric:
                assert node["RANGE"] == [{"MIN": param.minimum, "MAX": param.maximum}]
                assert node["TYPE"] == ("f" if param.kind is Kind.FLOAT else "i")
        assert find(tree, "/sd/guidance")["VALUE"] == [2.5]  # the current value, from the config
        assert find(tree, "/sd/prompt")["TYPE"] == "s"
        assert find(tree, "/sd/freeze")["TYPE"] == "T" and find(tree, "/sd/freeze")["VALUE"] == [False]
        assert find(tree, "/sd/t_index_list")["TYPE"] == "s"
        assert find(tree, "/sd/t_index_list")["VALUE"] == ["32 45"]
        assert find(tree, "/sd/prompt_blend")["TYPE"] == "s" and find(tree, "/sd/prompt_blend")["VALUE"] == [
            ""
        ]
        assert find(tree, "/sd/status/state") == {
            "FULL_PATH": "/sd/status/state", "ACCESS": 1, "TYPE": "s", "VALUE": ["running"]
        }  # fmt: skip
        # a change over OSC shows up in the tree once applied, and its type stays put
        bridge.store.submit("guidance", 4.0)
        bridge.store.submit("freeze", True)
        bridge.store.submit("t_index_list", (20, 30, 40))
        for _ in range(200):
            if get(base + "/sd/t_index_list?VALUE")[1] == {"VALUE": ["20 30 40"]}:
                break
            time.sleep(0.02)
        assert get(base + "/sd/guidance?VALUE") == (200, {"VALUE": [4.0]})
        assert get(base + "/sd/freeze?TYPE") == (200, {"TYPE": "T"})
        assert get(base + "/sd/freeze?VALUE") == (200, {"VALUE": [True]})
        assert get(base + "/sd/t_index_list?TYPE") == (200, {"TYPE": "s"})
        code, info = get(base + "/?HOST_INFO")
        assert code == 200 and info["OSC_PORT"] == osc_port and info["OSC_TRANSPORT"] == "UDP"
        assert info["EXTENSIONS"]["RANGE"] is True and info["EXTENSIONS"]["LISTEN"] is True
        assert get(base + "/sd/nothing") == (404, {"error": "no OSC node at /sd/nothing"})
        assert get(base + "/sd/prompt?RANGE") == (204, None)  # an attribute the node lacks
        assert get(base + "/sd?VALUE") == (204, None)  # a container has no value
        code, body = get(base + "/sd/prompt?NONSENSE")
        assert code == 400 and "unknown OSCQuery query 'NONSENSE'" in body["error"]


def test_python_oscquery_loads_the_tree_and_listen_follows_osc(tiny_pipe: Any) -> None:
    """python-oscquery 0.4.0 (the package index's client, not ours) reads HOST_INFO and the whole
    tree; a WebSocket client LISTENs to /sd/guidance and /sd/status/state (the proposal's text
    commands) and receives the value a real OSC datagram set, as a binary OSC packet."""
    pytest.importorskip("pythonoscquery")
    websockets_client = pytest.importorskip("websockets.sync.client")
    from pythonosc.osc_message import OscMessage
    from pythonoscquery.osc_query_client import OSCQueryClient
    from zeroconf import ServiceInfo

    from bridge.control.osc import encode

    osc_port, query_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    overrides = [f"osc.port={osc_port}", f"osc.oscquery_port={query_port}", "osc.oscquery_advertise=false",
                 "osc.status_targets=[]"]  # fmt: skip
    bridge = tiny_bridge(tiny_pipe, overrides)
    with in_background(bridge, start_timeout_s=120):
        # what a browse for _oscjson._tcp would have found, without the network
        found = ServiceInfo(
            "_oscjson._tcp.local.",
            "sdbridge@test._oscjson._tcp.local.",
            addresses=[socket.inet_aton("127.0.0.1")],
            port=query_port,
        )
        client = OSCQueryClient(found)
        info = client.get_host_info()
        assert info is not None and info.osc_port == osc_port and info.osc_transport == "UDP"
        assert info.osc_ip == "127.0.0.1" and info.extensions["LISTEN"] is True
        root = client.query_node("/")  # raises on a node with both children and a value
        assert root is not None
        nodes = {node.full_path: node for node in root}
        raw = client.last_json
        assert raw is not None
        python_type = {Kind.FLOAT: float, Kind.INT: int, Kind.BOOL: bool}
        for param in LIVE.values():
            node = nodes[param.address]
            assert not node.is_container and node.type == [python_type.get(param.kind, str)], param.name
            if param.numeric:
                assert find(raw, param.address)["RANGE"] == [{"MIN": param.minimum, "MAX": param.maximum}]
        assert nodes["/sd/status/fps"].type == [float]

        with websockets_client.connect(f"ws://127.0.0.1:{query_port}/", open_timeout=5) as ws:
            for path in ("/sd/guidance", "/sd/seed"):
                ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": path}))
            ws.send(json.dumps({"COMMAND": "IGNORE", "DATA": "/sd/seed"}))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as osc:
                got: list[Any] = []
                deadline = time.monotonic() + 10
                value = 3.0
                while not got:  # the server reads LISTEN on its own thread: send until it follows
                    assert time.monotonic() < deadline, "no LISTEN update arrived"
                    value += 0.25
                    osc.sendto(encode("/sd/seed", [7]), ("127.0.0.1", osc_port))
                    osc.sendto(encode("/sd/guidance", [value]), ("127.0.0.1", osc_port))
                    try:
                        message = OscMessage(ws.recv(timeout=0.5))
                    except TimeoutError:
                        continue
                    got = [message.address, *message.params]
                assert got[0] == "/sd/guidance" and 3.0 < got[1] <= value  # never /sd/seed: it was IGNOREd
                assert got[1] == pytest.approx(bridge.store.get("guidance"))
            ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/sd/status/frames"}))  # grows every frame
            deadline = time.monotonic() + 10
            while (message := OscMessage(ws.recv(timeout=10))).address != "/sd/status/frames":
                assert time.monotonic() < deadline, "no status update arrived"
            assert isinstance(message.params[0], int) and message.params[0] > 0


def test_the_norm_methods_stand_on_their_own_and_osc_takes_both_forms() -> None:
    """/sd/guidance is a method without children; its 0..1 variant is listed at /sd/norm/guidance,
    and a real OSC datagram to either /sd/norm/guidance or the old /sd/guidance/norm sets it."""
    from bridge.control.osc import OscControl, OscServer, encode

    store = ParamStore({})
    osc = OscServer("127.0.0.1", 0)
    control = OscControl(store, send=osc.send)
    osc.start(control)
    server = OscQueryServer(
        host="127.0.0.1", port=0, osc_port=osc.address[1], values=store.snapshot, status=dict,
        advertise=False, control=control,
    )  # fmt: skip
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        if (
            importlib.util.find_spec("pythonoscquery") is not None
        ):  # its parser refuses a method with children
            from pythonoscquery.shared.osc_path_node import OSCPathNode

            assert "/sd/norm/guidance" in {
                node.full_path for node in OSCPathNode.from_json(get(base + "/")[1])
            }
        assert "CONTENTS" not in get(base + "/sd/guidance")[1]
        code, node = get(base + "/sd/norm/guidance")
        assert code == 200 and node["TYPE"] == "f" and node["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}]
        assert node["VALUE"] == [pytest.approx(0.12)]  # 1.2 of 0..10
        assert get(base + "/sd/norm/ssf/max_skip?ACCESS") == (200, {"ACCESS": 3})
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for address, expected in (("/sd/norm/guidance", 5.0), ("/sd/guidance/norm", 2.5)):
                sender.sendto(encode(address, [expected / 10]), osc.address)
                deadline = time.monotonic() + 5
                while store.latest("guidance") != expected:
                    assert time.monotonic() < deadline, f"{address} never reached the store"
                    time.sleep(0.01)
        assert control.counters.accepted == 2 and control.counters.unknown == 0
    finally:
        server.close()
        osc.close()


def test_lists_and_blends_keep_one_type_and_osc_takes_their_string_form() -> None:
    tree = build_tree({"t_index_list": (5,), "prompt_blend": (("a cat", 0.7), ("a dog", 0.3))}, {})
    assert find(tree, "/sd/t_index_list")["TYPE"] == "s" and find(tree, "/sd/t_index_list")["VALUE"] == ["5"]
    blend = find(tree, "/sd/prompt_blend")
    assert blend["TYPE"] == "s" and blend["VALUE"] == ["a cat:0.7 | a dog:0.3"]
    assert coerce(LIVE["t_index_list"], ["20 30 40"]).value == (20, 30, 40)
    assert coerce(LIVE["t_index_list"], [20, 30, 40]).value == (20, 30, 40)  # today's form still works
    assert coerce(LIVE["prompt_blend"], ["a cat:0.7 | a dog:0.3"]).value == (("a cat", 0.7), ("a dog", 0.3))
    assert coerce(LIVE["prompt_blend"], ["a cat", 0.7]).value == (("a cat", 0.7),)
    assert find(build_tree({"ssf/enabled": True}, {}), "/sd/ssf/enabled")["TYPE"] == "T"


def test_the_tree_covers_config_only_parameters_not_at_all() -> None:
    tree = build_tree(ParamStore({}).snapshot(), {})
    assert find(tree, "/sd/model") is None and find(tree, "/sd/width") is None


def test_a_busy_port_names_the_setting() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            OSError, match=r"OSCQuery cannot listen on http://127\.0\.0\.1:\d+/: .*set osc\.oscquery_port"
        ):
            OscQueryServer(
                host="127.0.0.1", port=port, osc_port=7000, values=dict, status=dict, advertise=False
            )


def test_two_bridges_of_one_name_in_one_process_get_two_names() -> None:
    """Deterministic: the process's one responder knows which names it holds, so the second
    bridge of a name is "NAME (2)" whatever the network does, and both services are registered
    with their own ports on the bound address."""
    pytest.importorskip("zeroconf")  # in the dev extra, so CI runs it
    name = f"sdbridge-test-{uuid.uuid4().hex[:8]}"
    servers = [
        OscQueryServer(host="127.0.0.1", port=0, osc_port=osc, values=dict, status=dict, name=name)
        for osc in (7100, 7101)
    ]
    try:
        assert [server.announced_name for server in servers] == [name, f"{name} (2)"]
        responder = servers[0]._responder
        assert responder is not None and responder is servers[1]._responder
        for server in servers:
            for kind, port in (("_oscjson._tcp.local.", server.port), ("_osc._udp.local.", server.osc_port)):
                info = responder.zc.registry.async_get_info_name(f"{server.announced_name}.{kind}")
                assert info is not None and info.port == port and info.parsed_addresses() == ["127.0.0.1"]
        servers[0].close()
        again = OscQueryServer(host="127.0.0.1", port=0, osc_port=7102, values=dict, status=dict, name=name)
        servers[0] = again
        assert again.announced_name == name  # a closed bridge's name is free again
    finally:
        for server in servers:
            server.close()


def test_numbered_names() -> None:
    assert numbered_name("a", set()) == "a"
    assert numbered_name("a", {"a", "a (2)"}) == "a (3)"
    assert responder_interfaces("127.0.0.1", ["127.0.0.1"]) == ["127.0.0.1"]
    assert responder_interfaces("0.0.0.0", ["10.0.0.5"]) is None


ANNOUNCE_ONE = """
import sys, time
from bridge.control.oscquery import OscQueryServer
server = OscQueryServer(host="127.0.0.1", port=0, osc_port=7100, values=dict, status=dict, name=sys.argv[1])
print(server.announced_name, server.port, flush=True)
sys.stdin.read()
server.close()
"""


@pytest.mark.skipif(
    os.environ.get("SDBRIDGE_NETWORK_TESTS") != "1",
    reason="real mDNS across processes depends on the machine looping multicast back; "
    "set SDBRIDGE_NETWORK_TESTS=1 to run it (it is not part of CI)",
)
def test_two_bridges_of_one_name_in_two_processes_are_both_announced_over_mdns() -> None:
    """Real mDNS between processes: the second bridge hears the first answer a multicast
    question, takes "NAME (2)", and a separate client resolves both services."""
    zeroconf = pytest.importorskip("zeroconf")
    name = f"sdbridge-test-{uuid.uuid4().hex[:8]}"
    first = subprocess.Popen(
        [sys.executable, "-c", ANNOUNCE_ONE, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert first.stdout is not None and first.stdin is not None
    try:
        announced, port = first.stdout.readline().split()
        assert announced == name
        second = OscQueryServer(host="127.0.0.1", port=0, osc_port=7101, values=dict, status=dict, name=name)
        client = zeroconf.Zeroconf(interfaces=["127.0.0.1"])
        try:
            assert second.announced_name == f"{name} (2)"
            for instance, http_port in ((name, int(port)), (second.announced_name, second.port)):
                info = client.get_service_info(
                    "_oscjson._tcp.local.", f"{instance}._oscjson._tcp.local.", 3000
                )
                assert info is not None, instance
                assert info.port == http_port and info.parsed_addresses() == ["127.0.0.1"]
        finally:
            client.close()
            second.close()
    finally:
        first.stdin.close()
        first.wait(timeout=10)


def test_a_wildcard_bind_announces_the_machines_outside_addresses() -> None:
    assert announced_addresses("0.0.0.0", ["127.0.0.1", "10.0.0.5", "192.168.1.9"]) == [
        "10.0.0.5",
        "192.168.1.9",
    ]
    assert announced_addresses("", ["127.0.0.1"]) == ["127.0.0.1"]
    assert announced_addresses("127.0.0.1", ["10.0.0.5"]) == ["127.0.0.1"]
