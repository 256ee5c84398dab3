"""A test server outside the platform, reachable from instances only through the NAT, and the host
addresses the hostile-function tests aim at.

`outside_server()` makes a network namespace `hxbtest-srv-<random>` joined to the host by a veth
pair (host end `.1/30`, server end `.2/30`, nothing routed but that /30), runs a small HTTP server
in it on the given ports, and removes all of it on exit, even when the test failed. Every name is
random, so a run never touches another run's objects, nor the platform's (`hx<id>v*`, `hx<id>-*`),
nor test_network.py's (`hxbtest-srv`, `hxbtsrv0`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import select
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

PROCESS_TIMEOUT_S = 10.0

# Answers every GET with "hxb-outside port=<port> peer=<client address>": a test can tell which
# listener answered and that the client was masqueraded.
_SERVER = textwrap.dedent(
    """
    import sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = "hxb-outside port={} peer={}".format(self.server.server_address[1], self.client_address[0])
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    servers = [ThreadingHTTPServer((sys.argv[1], int(port)), Handler) for port in sys.argv[2:]]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()
    """
)


@dataclass(frozen=True)
class OutsideServer:
    netns: str
    host_link: str
    host_addr: str  # the host's end of the link: what the server sees after the NAT
    addr: str
    ports: tuple[int, ...]

    def url(self, port: int) -> str:
        return f"http://{self.addr}:{port}/"

    def body(self, port: int) -> str:
        return f"hxb-outside port={port} peer={self.host_addr}"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=PROCESS_TIMEOUT_S)


def _free_third_octet() -> int:
    """A 10.214.<x>.0/30 the host routes nowhere yet (test_network.py uses x = 0)."""
    routes = json.loads(_sh("ip", "-j", "-4", "route", "show", "table", "all").stdout)
    used = []
    for route in routes:
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    for _ in range(50):
        x = 1 + secrets.randbelow(254)
        block = ipaddress.ip_network(f"10.214.{x}.0/30")
        if not any(block.overlaps(net) for net in used if net.prefixlen > 0):
            return x
    raise RuntimeError("no free 10.214.x.0/30 on this host")


def _remove(netns: str, link: str) -> None:
    # Deleting the namespace deletes its veth end, which takes the host end with it.
    _sh("ip", "netns", "del", netns, check=False)
    _sh("ip", "link", "del", link, check=False)


@contextlib.contextmanager
def outside_server(ports: Sequence[int]) -> Iterator[OutsideServer]:
    token = secrets.token_hex(3)
    x = _free_third_octet()
    server = OutsideServer(
        netns=f"hxbtest-srv-{token}",
        host_link=f"hxbhs{token}",
        host_addr=f"10.214.{x}.1",
        addr=f"10.214.{x}.2",
        ports=tuple(ports),
    )
    proc: subprocess.Popen[str] | None = None
    try:
        _sh("ip", "netns", "add", server.netns)
        _sh("ip", "link", "add", server.host_link, "type", "veth", "peer", "name", "eth0", "netns", server.netns)
        _sh("ip", "link", "set", server.host_link, "addrgenmode", "none")
        _sh("ip", "addr", "add", f"{server.host_addr}/30", "dev", server.host_link)
        _sh("ip", "link", "set", server.host_link, "up")
        for command in ("link set lo up", "link set eth0 addrgenmode none", f"addr add {server.addr}/30 dev eth0"):
            _sh("ip", "-n", server.netns, *command.split())
        _sh("ip", "-n", server.netns, "link", "set", "eth0", "up")
        argv = ["ip", "netns", "exec", server.netns, sys.executable, "-c", _SERVER, server.addr]
        proc = subprocess.Popen([*argv, *map(str, ports)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], PROCESS_TIMEOUT_S)
        if not ready or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the outside test server did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield server
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.communicate(timeout=PROCESS_TIMEOUT_S)
        _remove(server.netns, server.host_link)


def host_ipv4(ifname: str = "eth0") -> str:
    """The host's address on `ifname`; without one, the address of the default route's interface
    (a UDP connect sends nothing: it only picks the source address)."""
    out = _sh("ip", "-4", "-o", "addr", "show", "dev", ifname, check=False).stdout.split()
    if "inet" in out:
        return out[out.index("inet") + 1].split("/")[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        address: str = probe.getsockname()[0]
        return address


def tcp_outcome(host: str, port: int, timeout_s: float = 2.0) -> str:
    """Connects from the test process: "connected", "refused", "timeout" or "error:<errno>"."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error:{exc.errno}"
