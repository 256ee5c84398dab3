"""Instance networking on the real kernel: NAT out, nothing in, no host, no neighbours, egress allow-lists.

Every address probed lives on this machine: the host's own, our instances', or a test server in a
namespace the test creates (`hxbtest-srv`), reachable from instances only through the NAT. Every
network wait is bounded (PROBE_TIMEOUT_S), and every object created is removed even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hxb.errors import SandboxUnavailableError
from hxb.sandbox.network import (
    IP_FORWARD_ORIGINAL,
    IP_FORWARD_SYSCTL,
    NETNS_DIR,
    InstanceNetwork,
    NetworkManager,
    NetworkStatistics,
)
from hxb.spec import EgressRule

PREFIX = "hxbt"  # not the platform's "hxb": a platform running on this host is never touched
SUBNET = "10.216.0.0/24"
SRV_NETNS = "hxbtest-srv"
SRV_LINK = "hxbtsrv0"  # does not match the manager's "hxbtv*"
SRV_HOST_ADDR = "10.214.0.1"
SRV_ADDR = "10.214.0.2"
SRV_OTHER_ADDR = "10.214.0.3"
SRV_PORT = 8080
SRV_OTHER_PORT = 8081
SRV_COUNT_PORT = 8082
SRV_LINK_MTU = 1280  # below the instances' 1500: the host must send them "fragmentation needed"
INSTANCE_PORT = 9000
PROBE_TIMEOUT_S = 1.0  # a dropped SYN shows as a timeout: keep it short
PROCESS_TIMEOUT_S = 10.0  # python startup included; only hit if something is badly wrong

# Connects, optionally uploads some bytes, reads what the server says, and prints the outcome.
CLIENT = textwrap.dedent(
    """
    import socket, sys
    host, port, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    upload_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            if upload_bytes:
                conn.sendall(b"x" * upload_bytes)
                conn.shutdown(socket.SHUT_WR)
            print("ok:" + conn.recv(100).decode())
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
    except OSError as exc:
        print("error:" + str(exc))
    """
)

# Answers every connection with the peer address it saw, so a test can tell NAT happened; or,
# in "count" mode, with the number of bytes received.
SERVER = textwrap.dedent(
    """
    import socket, sys
    count = len(sys.argv) > 3 and sys.argv[3] == "count"
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen(16)
    print("ready", srv.getsockname()[1], flush=True)
    while True:
        conn, peer = srv.accept()
        with conn:
            if not count:
                conn.sendall(peer[0].encode())
                continue
            conn.settimeout(3)
            received = 0
            while chunk := conn.recv(65536):
                received += len(chunk)
            conn.sendall(str(received).encode())
    """
)


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=PROCESS_TIMEOUT_S)


def _nft(rules: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, timeout=PROCESS_TIMEOUT_S)


def _start_server(netns_path: Path | None, host: str, port: int, mode: str = "peer") -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", SERVER, host, str(port), mode]
    if netns_path is not None:
        argv = ["nsenter", f"--net={netns_path}", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], PROCESS_TIMEOUT_S)
    if not ready or not proc.stdout.readline().startswith("ready"):
        _stop(proc)
        pytest.fail(f"test server {host}:{port} did not start")
    return proc


def _start_host_server() -> tuple[subprocess.Popen[str], int]:
    """A server in the host namespace on every address and a port of the kernel's choosing."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, "0.0.0.0", "0"],  # noqa: S104
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], PROCESS_TIMEOUT_S)
    words = proc.stdout.readline().split() if ready else []
    if len(words) != 2 or words[0] != "ready":
        _stop(proc)
        pytest.fail("host test server did not start")
    return proc, int(words[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.communicate(timeout=PROCESS_TIMEOUT_S)


async def probe(netns_path: Path | None, host: str, port: int, upload_bytes: int = 0) -> str:
    """Connects to host:port from inside `netns_path` (the host itself if None)."""
    argv = [sys.executable, "-c", CLIENT, host, str(port), str(PROBE_TIMEOUT_S), str(upload_bytes)]
    if netns_path is not None:
        argv = ["nsenter", f"--net={netns_path}", *argv]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


def _table_exists() -> bool:
    return f"table inet {PREFIX}" in _sh("nft", "list", "tables").stdout.splitlines()


def _link_exists(name: str) -> bool:
    return _sh("ip", "link", "show", "dev", name, check=False).returncode == 0


def _set_elements(set_name: str) -> str:
    return _sh("nft", "list", "set", "inet", PREFIX, set_name).stdout


def _host_ipv4_addresses() -> list[str]:
    """Every IPv4 address of the host namespace but loopback: eth0's, gateways, the test link's."""
    links = json.loads(_sh("ip", "-j", "-4", "addr", "show").stdout)
    return [
        info["local"] for link in links for info in link.get("addr_info", []) if not info["local"].startswith("127.")
    ]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def no_leftovers() -> AsyncIterator[None]:
    """Restores forwarding and removes whatever a test (or a run killed half-way) left, even
    when it failed. The prefix is this module's own: no platform uses it."""
    await NetworkManager.cleanup_stale(PREFIX)
    before = IP_FORWARD_SYSCTL.read_text()
    yield
    await NetworkManager.cleanup_stale(PREFIX)
    IP_FORWARD_SYSCTL.write_text(before)


def _remove_server_namespace() -> None:
    _sh("ip", "netns", "del", SRV_NETNS, check=False)
    _sh("ip", "link", "del", SRV_LINK, check=False)


@pytest.fixture(scope="module")
def server_ns() -> Iterator[Path]:
    """A namespace of its own with a server on SRV_ADDR and SRV_OTHER_ADDR, ports SRV_PORT and
    SRV_OTHER_PORT (and a byte counter on SRV_COUNT_PORT). It routes only its own /29, so instances
    reach it only through the NAT. Its host end has a smaller MTU, like this VM's eth0 (1400)."""
    _remove_server_namespace()  # a run killed half-way
    procs: list[subprocess.Popen[str]] = []
    try:
        _sh("ip", "netns", "add", SRV_NETNS)
        _sh("ip", "link", "add", SRV_LINK, "type", "veth", "peer", "name", "eth0", "netns", SRV_NETNS)
        _sh("ip", "link", "set", SRV_LINK, "addrgenmode", "none", "mtu", str(SRV_LINK_MTU))
        _sh("ip", "addr", "add", f"{SRV_HOST_ADDR}/29", "dev", SRV_LINK)
        _sh("ip", "link", "set", SRV_LINK, "up")
        for command in (
            "link set lo up",
            "link set eth0 addrgenmode none",
            f"addr add {SRV_ADDR}/29 dev eth0",
            f"addr add {SRV_OTHER_ADDR}/29 dev eth0",
            "link set eth0 up",
        ):
            _sh("ip", "-n", SRV_NETNS, *command.split())
        path = NETNS_DIR / SRV_NETNS
        procs = [_start_server(path, "0.0.0.0", port) for port in (SRV_PORT, SRV_OTHER_PORT)]  # noqa: S104
        procs.append(_start_server(path, "0.0.0.0", SRV_COUNT_PORT, "count"))  # noqa: S104
        yield path
    finally:
        for proc in procs:
            _stop(proc)
        _remove_server_namespace()


@pytest.fixture
async def manager() -> AsyncIterator[NetworkManager]:
    manager = await NetworkManager.open(subnet=SUBNET, prewarm=2, name_prefix=PREFIX)
    try:
        async with asyncio.timeout(5):
            await manager.wait_prewarmed()
        yield manager
    finally:
        await manager.close()


@pytest.fixture
def instance_server() -> Iterator[list[subprocess.Popen[str]]]:
    """Servers a test starts (inside instances or on the host); killed at the end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        _stop(proc)


# --- behaviour ----------------------------------------------------------------------------------


async def test_outbound_tcp_reaches_server_through_nat(manager: NetworkManager, server_ns: Path) -> None:
    network = await manager.acquire(None)

    # The server saw the host's address on its link: the instance's address was masqueraded.
    assert await probe(network.netns_path, SRV_ADDR, SRV_PORT) == f"ok:{SRV_HOST_ADDR}"


async def test_path_mtu_discovery_works_through_the_rules(manager: NetworkManager, server_ns: Path) -> None:
    network = await manager.acquire(None)

    # Full-size segments only get through once the instance has accepted the host's ICMP
    # "fragmentation needed", which is allowed back in as related to the connection.
    assert await probe(network.netns_path, SRV_ADDR, SRV_COUNT_PORT, upload_bytes=256 * 1024) == f"ok:{256 * 1024}"


async def test_host_addresses_unreachable_from_instance(
    manager: NetworkManager, instance_server: list[subprocess.Popen[str]]
) -> None:
    other = await manager.acquire(None)
    network = await manager.acquire(None)
    server, port = _start_host_server()
    instance_server.append(server)
    host_addresses = _host_ipv4_addresses()
    assert network.gateway in host_addresses
    assert other.gateway in host_addresses
    assert await probe(None, host_addresses[0], port) == f"ok:{host_addresses[0]}"  # it does listen

    outcomes = await asyncio.gather(*(probe(network.netns_path, addr, port) for addr in host_addresses))
    loopback = await probe(network.netns_path, "127.0.0.1", port)

    assert dict(zip(host_addresses, outcomes, strict=True)) == dict.fromkeys(host_addresses, "timeout")
    assert loopback == "refused"  # the instance's own loopback, where nothing listens


DNAT_TABLE = "hxbtest_dnat"
DNAT_PORT = 18999


async def test_host_ports_forwarded_elsewhere_are_unreachable_from_instance(
    manager: NetworkManager, server_ns: Path
) -> None:
    """A port the host forwards (DNAT, as docker's published ports) leads off the host: still
    the host's address, so still out of an instance's reach."""
    network = await manager.acquire(None)
    host_address = next(a for a in _host_ipv4_addresses() if not a.startswith("127."))
    rules = (
        f"table ip {DNAT_TABLE} {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n"
        f"  ip daddr {host_address} tcp dport {DNAT_PORT} dnat to {SRV_ADDR}:{SRV_PORT}\n }}\n}}\n"
    )
    _nft(rules)
    try:
        reached = await probe(network.netns_path, host_address, DNAT_PORT)
        direct = await probe(network.netns_path, SRV_ADDR, SRV_PORT)
    finally:
        _sh("nft", "delete", "table", "ip", DNAT_TABLE, check=False)
    assert direct.startswith("ok:")  # the server itself is reachable through the NAT
    assert reached == "timeout"


async def test_instances_cannot_reach_each_other(
    manager: NetworkManager, instance_server: list[subprocess.Popen[str]]
) -> None:
    a = await manager.acquire(None)
    b = await manager.acquire(None)
    instance_server.append(_start_server(a.netns_path, "0.0.0.0", INSTANCE_PORT))  # noqa: S104

    assert await probe(a.netns_path, a.address, INSTANCE_PORT) == f"ok:{a.address}"
    assert await probe(b.netns_path, a.address, INSTANCE_PORT) == "timeout"


async def test_nothing_outside_can_connect_to_instance(
    manager: NetworkManager, server_ns: Path, instance_server: list[subprocess.Popen[str]]
) -> None:
    network = await manager.acquire(None)
    instance_server.append(_start_server(network.netns_path, "0.0.0.0", INSTANCE_PORT))  # noqa: S104
    # Give the outside namespace a route to the instances, as a router on the LAN would have.
    _sh("ip", "-n", SRV_NETNS, "route", "add", SUBNET, "via", SRV_HOST_ADDR)
    try:
        from_host = await probe(None, network.address, INSTANCE_PORT)
        from_outside = await probe(server_ns, network.address, INSTANCE_PORT)
    finally:
        _sh("ip", "-n", SRV_NETNS, "route", "del", SUBNET, "via", SRV_HOST_ADDR)

    # Dropped on the host's output path: TCP may retry the SYN until the timeout, or report EPERM.
    assert from_host in {"timeout", "error:[Errno 1] Operation not permitted"}
    assert from_outside == "timeout"


async def test_egress_allow_list_limits_destinations_and_ports(manager: NetworkManager, server_ns: Path) -> None:
    restricted = await manager.acquire([EgressRule(cidr=f"{SRV_ADDR}/32", ports=[SRV_PORT])])
    unrestricted = await manager.acquire(None)

    outcomes = await asyncio.gather(
        probe(restricted.netns_path, SRV_ADDR, SRV_PORT),
        probe(restricted.netns_path, SRV_ADDR, SRV_OTHER_PORT),
        probe(restricted.netns_path, SRV_OTHER_ADDR, SRV_PORT),
        probe(unrestricted.netns_path, SRV_OTHER_ADDR, SRV_OTHER_PORT),
    )

    assert list(outcomes) == [f"ok:{SRV_HOST_ADDR}", "timeout", "timeout", f"ok:{SRV_HOST_ADDR}"]


async def test_empty_allow_list_blocks_everything(manager: NetworkManager, server_ns: Path) -> None:
    network = await manager.acquire([])

    assert await probe(network.netns_path, SRV_ADDR, SRV_PORT) == "timeout"


async def test_instance_has_no_ipv6(manager: NetworkManager) -> None:
    network = await manager.acquire(None)
    netns = f"--net={network.netns_path}"

    addresses = _sh("nsenter", netns, "ip", "-6", "-o", "addr", "show").stdout
    routes = _sh("nsenter", netns, "ip", "-6", "route", "show").stdout

    assert [line.split()[1] for line in addresses.splitlines()] == ["lo"]  # ::1 only, no link-local
    assert "default" not in routes
    assert "inet6" not in _sh("ip", "-6", "addr", "show", "dev", network.host_ifname).stdout


async def test_release_removes_namespace_veth_and_rules(manager: NetworkManager) -> None:
    network = await manager.acquire([EgressRule(cidr="192.0.2.0/24", ports=[443])])
    assert network.netns_path.exists()
    assert _link_exists(network.host_ifname)
    assert network.host_ifname in _set_elements("restricted")
    assert network.host_ifname in _set_elements("allow_ports")

    await manager.release(network)
    await manager.release(network)  # idempotent

    assert not network.netns_path.exists()
    assert not _link_exists(network.host_ifname)
    assert network.host_ifname not in _set_elements("restricted")
    assert network.host_ifname not in _set_elements("allow_ports")
    stats = manager.statistics()
    assert (stats.in_use, stats.released, stats.quarantined) == (0, 1, 0)


async def test_released_address_is_reused_last_and_only_by_a_new_lease() -> None:
    manager = await NetworkManager.open(subnet="10.216.0.0/28", prewarm=0, name_prefix=PREFIX)  # 4 slots
    try:
        first = await manager.acquire(None)
        await manager.release(first)
        others = [await manager.acquire(None) for _ in range(3)]
        reused = await manager.acquire(None)
        assert first.address not in {n.address for n in others}  # unused addresses go first
        assert (reused.address, reused.host_ifname) == (first.address, first.host_ifname)
        assert reused.lease_id != first.lease_id

        await manager.release(first)  # a stale lease of the same slot: must not touch the new one

        assert reused.netns_path.exists()
        assert _link_exists(reused.host_ifname)
    finally:
        await manager.close()


async def test_acquire_with_empty_pool_prepares_now() -> None:
    manager = await NetworkManager.open(subnet=SUBNET, prewarm=0, name_prefix=PREFIX)
    try:
        network = await manager.acquire(None)
        assert isinstance(network, InstanceNetwork)
        assert network.netns_path.exists()
        assert manager.statistics().created == 1
    finally:
        await manager.close()


async def test_open_refuses_a_second_manager_with_the_same_prefix(manager: NetworkManager) -> None:
    with pytest.raises(SandboxUnavailableError, match="cleanup_stale"):
        await NetworkManager.open(subnet=SUBNET, prewarm=0, name_prefix=PREFIX)


async def test_close_removes_everything_and_restores_ip_forward() -> None:
    IP_FORWARD_SYSCTL.write_text("0\n")
    manager = await NetworkManager.open(subnet=SUBNET, prewarm=2, name_prefix=PREFIX)
    network = await manager.acquire([EgressRule(cidr="192.0.2.0/24")])
    assert IP_FORWARD_SYSCTL.read_text().strip() == "1"
    assert _table_exists()

    await manager.close()

    assert IP_FORWARD_SYSCTL.read_text().strip() == "0"
    assert not _table_exists()
    assert not network.netns_path.exists()
    assert not _link_exists(network.host_ifname)
    assert not [name for name in os.listdir(NETNS_DIR) if name.startswith(f"{PREFIX}-")]
    with pytest.raises(SandboxUnavailableError, match="closed"):
        await manager.acquire(None)


def _kill_a_platform_with_networks() -> None:
    """Runs a platform that opens the manager, hands out a network, refills its pool and is then
    SIGKILLed: its table, veths and namespaces stay behind."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from hxb.sandbox.network import NetworkManager
        async def main():
            manager = await NetworkManager.open(subnet={SUBNET!r}, prewarm=2, name_prefix={PREFIX!r})
            await manager.wait_prewarmed()
            await manager.acquire(None)
            await manager.wait_prewarmed()  # refilled: two prepared, one in use
            print("ready", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], PROCESS_TIMEOUT_S)
        assert ready
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=PROCESS_TIMEOUT_S)


async def test_cleanup_stale_removes_what_a_killed_platform_left() -> None:
    IP_FORWARD_SYSCTL.write_text("0\n")
    _kill_a_platform_with_networks()
    assert _table_exists()
    assert IP_FORWARD_SYSCTL.read_text().strip() == "1"

    removed = await NetworkManager.cleanup_stale(PREFIX)

    assert removed == 1 + 3 + 3  # the table, three veths, three namespaces
    assert not _table_exists()
    assert IP_FORWARD_SYSCTL.read_text().strip() == "0"  # no other platform: the host's own again
    assert not IP_FORWARD_ORIGINAL.exists()
    assert not [name for name in os.listdir(NETNS_DIR) if name.startswith(f"{PREFIX}-")]
    assert not [name for name in os.listdir("/sys/class/net") if name.startswith(f"{PREFIX}v")]
    assert await NetworkManager.cleanup_stale(PREFIX) == 0
    manager = await NetworkManager.open(subnet=SUBNET, prewarm=0, name_prefix=PREFIX)  # no leftovers now
    await manager.close()


async def test_describe_reports_subnet_dns_and_counts(manager: NetworkManager) -> None:
    await manager.acquire(None)
    async with asyncio.timeout(5):
        await manager.wait_prewarmed()

    report = manager.describe()

    assert report["subnet"] == SUBNET
    assert report["nftables_table"] == f"inet {PREFIX}"
    assert report["statistics"] == {"prepared": 2, "in_use": 1, "created": 3, "released": 0, "quarantined": 0}


async def test_overlapping_allow_list_installs(manager: NetworkManager, server_ns: Path) -> None:
    rules = [
        EgressRule(cidr="10.214.0.0/29"),
        EgressRule(cidr="10.214.0.2/32", ports=[SRV_PORT, SRV_OTHER_PORT]),
        EgressRule(cidr="10.0.0.0/8", ports=[SRV_OTHER_PORT]),
        EgressRule(cidr="10.214.0.0/24", ports=[SRV_PORT], protocol="any"),
        EgressRule(cidr="2001:db8::/32"),
    ]

    network = await manager.acquire(rules)

    assert await probe(network.netns_path, SRV_OTHER_ADDR, SRV_OTHER_PORT) == f"ok:{SRV_HOST_ADDR}"


async def test_host_local_resolvers_are_reported_not_used(tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver 127.0.0.53\nnameserver {_host_ipv4_addresses()[0]}\n")
    manager = await NetworkManager.open(subnet=SUBNET, prewarm=0, name_prefix=PREFIX, resolv_conf=resolv_conf)
    try:
        network = await manager.acquire(None)
        report = manager.describe()
    finally:
        await manager.close()

    assert network.nameservers == ()
    assert report["nameservers"] == []
    assert "instances have no DNS" in str(report["dns"])


async def test_close_during_acquire_and_release_leaks_nothing() -> None:
    manager = await NetworkManager.open(subnet=SUBNET, prewarm=0, name_prefix=PREFIX)
    held = await manager.acquire([EgressRule(cidr="192.0.2.0/24")])
    acquiring = asyncio.create_task(manager.acquire(None))  # the pool is empty: it prepares one
    releasing = asyncio.create_task(manager.release(held))
    await asyncio.sleep(0)  # both under way

    await manager.close()

    with pytest.raises(SandboxUnavailableError, match="closed"):
        await acquiring
    await releasing
    assert manager.statistics() == NetworkStatistics(prepared=0, in_use=0, created=2, released=2, quarantined=0)
    assert not _table_exists()
    assert not [name for name in os.listdir(NETNS_DIR) if name.startswith(f"{PREFIX}-")]
    assert not [name for name in os.listdir("/sys/class/net") if name.startswith(f"{PREFIX}v")]
