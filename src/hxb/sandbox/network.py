"""Outbound-only networking for instances: a network namespace per instance, joined to the host by
a veth pair, NAT on the way out, and an nftables table of our own that keeps instances away from
the host, from each other and, per function, from everything outside an egress allow-list.

Layout: the subnet (default 10.213.0.0/16) is cut into /30 slots. Slot N is the host interface
`<prefix>v<N>` with the slot's first address (the instance's gateway) and the namespace
`/run/netns/<prefix>-<N>`, holding `lo` and `eth0` with the second address. Namespaces are
prepared in the background, so handing one to an instance costs no subprocess unless the
function has an egress allow-list (one `nft` run).

Measured on the development VM (2 vCPUs, kernel 6.18, iproute2 6.1, nftables 1.0.6), medians:
preparing a namespace is two `ip -batch` runs, 9 ms (pyroute2 took 32 ms for the same, as its
netns calls fork a helper process); acquiring a prepared one takes 15 us, or 5-6 ms with an
allow-list (one `nft` run, flat in the number of instances, as the rules are set elements, not
chains); releasing takes 30 ms, nearly all of it the kernel deleting the veth, plus 20 ms when
an allow-list is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from hxb._subprocess import run_process
from hxb.errors import ConfigError, InternalError, SandboxSpawnError, SandboxUnavailableError

if TYPE_CHECKING:
    from hxb.spec import EgressRule

log = logging.getLogger(__name__)

# Where `ip netns` keeps the files that pin a namespace; the sandbox open()s and setns()es ours.
NETNS_DIR: Final = Path("/run/netns")
IP_FORWARD_SYSCTL: Final = Path("/proc/sys/net/ipv4/ip_forward")
RESOLV_CONF: Final = Path("/etc/resolv.conf")

# Link-local holds the cloud metadata endpoints (169.254.169.254): a function reaching it would
# read the host's credentials. Blocked for every instance, whatever its allow-list says.
BLOCKED_DESTINATIONS: Final = ("169.254.0.0/16",)

_IFNAMSIZ: Final = 15  # the kernel's limit on interface names, without the NUL
_PREFIX_RE: Final = re.compile(r"[a-z][a-z0-9]{0,7}")
_TRANSPORTS: Final = ("tcp", "udp")
_COMMAND_TIMEOUT_S: Final = 10.0
_REFILL_BACKOFF_S: Final = 1.0
# English messages from ip and nft, and no dependence on the platform's PATH for their helpers.
_TOOL_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
_CAP_NET_ADMIN: Final = 12  # interfaces, addresses, routes, nftables
_CAP_SYS_ADMIN: Final = 21  # the bind mount that pins a namespace in /run/netns


# --- pure parts: names, addresses, rulesets (unit-tested without root) -------------------------


@dataclass(frozen=True, slots=True)
class InstanceNetwork:
    """A prepared, configured network namespace handed to one instance."""

    netns_path: Path  # open() it and setns(fd, CLONE_NEWNET) before exec
    address: str  # the instance's IPv4 address on its eth0
    gateway: str  # the host end of the veth, the instance's default route
    host_ifname: str
    nameservers: tuple[str, ...]  # for the instance's /etc/resolv.conf; may be empty
    lease_id: int  # tells two leases of the same (recycled) slot apart, so a stale release is a no-op


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    prepared: int  # namespaces ready in the pool
    in_use: int  # handed out and not yet released
    created: int  # namespaces created since open
    released: int  # namespaces removed since open (released, closed, or cleaned after a failure)
    quarantined: int  # slots whose setup or teardown failed: not reused until their cleanup succeeds


@dataclass(frozen=True, slots=True)
class Naming:
    """Every host object we create carries the prefix, so leftovers can be found and no one
    else's objects are ever touched."""

    prefix: str

    @classmethod
    def parse(cls, prefix: str, *, slots: int) -> Naming:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ConfigError(f"network name prefix {prefix!r} must be 1-8 characters of a-z and 0-9, starting a-z")
        longest = f"{prefix}v{slots - 1}"
        if len(longest) > _IFNAMSIZ:
            raise ConfigError(
                f"interface name {longest!r} is longer than {_IFNAMSIZ} characters: "
                "use a shorter prefix or a smaller subnet"
            )
        return cls(prefix)

    @property
    def table(self) -> str:
        return self.prefix

    @property
    def link_wildcard(self) -> str:
        return f"{self.prefix}v*"

    def link(self, slot: int) -> str:
        return f"{self.prefix}v{slot}"

    def netns(self, slot: int) -> str:
        return f"{self.prefix}-{slot}"

    def owns_link(self, name: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.prefix)}v\d+", name) is not None

    def owns_netns(self, name: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.prefix)}-\d+", name) is not None


@dataclass(frozen=True, slots=True)
class SubnetPlan:
    """The subnet cut into /30 slots: .0 network, .1 gateway (host), .2 instance, .3 broadcast."""

    network: ipaddress.IPv4Network

    @classmethod
    def parse(cls, subnet: str) -> SubnetPlan:
        try:
            network = ipaddress.ip_network(subnet, strict=True)
        except ValueError as exc:
            raise ConfigError(f"instance subnet {subnet!r} is not a network: {exc}") from None
        if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
            raise ConfigError(f"instance subnet {subnet!r} must be an IPv4 network of /30 or larger")
        return cls(network)

    @property
    def slots(self) -> int:
        return int(self.network.num_addresses // 4)

    def gateway(self, slot: int) -> str:
        return str(self.network.network_address + 4 * slot + 1)

    def address(self, slot: int) -> str:
        return str(self.network.network_address + 4 * slot + 2)


class SlotAllocator:
    """Hands out slot numbers: never-used ones first, then the least recently freed. A freed
    address thus rests as long as possible before reuse, so the conntrack entries of its previous
    user (which may outlive it by days for TCP) have aged out before a new instance gets it."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._next_unused = 0
        self._free: deque[int] = deque()
        self._taken: set[int] = set()

    @property
    def taken(self) -> int:
        return len(self._taken)

    @property
    def available(self) -> int:
        return self._capacity - len(self._taken)

    def take(self) -> int:
        if self._next_unused < self._capacity:
            slot = self._next_unused
            self._next_unused += 1
        elif self._free:
            slot = self._free.popleft()
        else:
            raise SandboxSpawnError(f"all {self._capacity} instance network slots are in use")
        self._taken.add(slot)
        return slot

    def give_back(self, slot: int) -> None:
        if slot not in self._taken:
            raise InternalError(f"network slot {slot} given back but not taken")
        self._taken.remove(slot)
        self._free.append(slot)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[str, ...]  # IPv4, not the host's own: what instances can use
    # Loopback (another namespace's), IPv6 (instances have none) or the host's own addresses
    # (instances may not reach the host): listed by `describe()`, never used.
    unusable: tuple[str, ...]

    @property
    def note(self) -> str:
        if self.nameservers:
            return "instances use the host's nameservers"
        if self.unusable:
            return (
                f"instances have no DNS: the host's resolv.conf lists only {', '.join(self.unusable)}, "
                "which instances cannot reach (loopback or other host-local resolvers, or IPv6)"
            )
        return "instances have no DNS: the host's resolv.conf lists no nameserver"


def parse_resolv_conf(text: str) -> DnsConfig:
    usable: list[str] = []
    unusable: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1].split("%")[0])
        except ValueError:
            continue
        target = usable if address.version == 4 and not address.is_loopback else unusable
        if fields[1] not in target:
            target.append(fields[1])
    return DnsConfig(nameservers=tuple(usable), unusable=tuple(unusable))


def render_ruleset(
    *,
    naming: Naming,
    subnet: ipaddress.IPv4Network,
    nameservers: Sequence[str],
    blocked: Sequence[str],
    host_was_router: bool,
) -> str:
    """The `nft -f` text of our table. `create table` first, so that a table left by a running
    or killed platform fails the whole (atomic) load instead of being merged with."""
    t = naming.table
    ifs = f'"{naming.link_wildcard}"'
    servers = f"\n\t\telements = {{ {', '.join(nameservers)} }}" if nameservers else ""
    blocked_set = ", ".join(blocked)
    # With forwarding off before us, nobody on this host routed: keep it so for everything that
    # is not an instance, rather than turn the host into a router for its whole LAN.
    # Traffic of another platform's instances (every platform's interfaces start alike) is
    # that platform's to judge: dropping it here would cut it off.
    family = f'"{_TABLE_FAMILY_PREFIX}*"'
    not_a_router = (
        ""
        if host_was_router
        else f'\n\t\tiifname != {family} oifname != {family} counter drop comment "the host was not a router before hxb"'  # noqa: E501
    )
    return f"""create table inet {t}
table inet {t} {{
	set restricted {{
		type ifname
		comment "instances with an egress allow-list"
	}}
	set nameservers {{
		type ipv4_addr{servers}
	}}
	set allow_ports {{
		typeof iifname . ip daddr . meta l4proto . th dport
		flags interval
	}}
	set allow_hosts {{
		typeof iifname . ip daddr
		flags interval
	}}
	chain prerouting {{
		type filter hook prerouting priority dstnat - 50; policy accept;
		iifname {ifs} fib daddr type local counter drop comment "host addresses, even DNATed"
	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname {ifs} ct state established,related accept
		iifname {ifs} counter drop comment "instances may not reach the host"
	}}
	chain output {{
		type filter hook output priority filter; policy accept;
		oifname {ifs} ct state established,related accept
		oifname {ifs} counter drop comment "the host opens no connection to an instance"
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		oifname {ifs} ct state established,related accept
		oifname {ifs} counter drop comment "nothing opens a connection to an instance"
		iifname {ifs} jump from_instance{not_a_router}
	}}
	chain from_instance {{
		meta nfproto != ipv4 counter drop comment "IPv4 only"
		ip saddr != {subnet} counter drop comment "spoofed source"
		fib saddr . iif oif missing counter drop comment "source not routed back through this veth"
		ip daddr {{ {blocked_set} }} counter drop
		iifname @restricted jump egress
		accept
	}}
	chain egress {{
		ip daddr @nameservers meta l4proto {{ tcp, udp }} th dport 53 accept
		iifname . ip daddr . meta l4proto . th dport @allow_ports accept
		iifname . ip daddr @allow_hosts accept
		meta l4proto icmp ct state related accept
		counter drop comment "not on the function's egress allow-list"
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr {subnet} oifname != {ifs} masquerade
	}}
}}
"""


@dataclass(frozen=True, slots=True)
class EgressElements:
    """One instance's allow-list as elements of the table's sets."""

    ifname: str
    ports: tuple[str, ...]  # "ifname" . network . protocol . port(s)
    hosts: tuple[str, ...]  # "ifname" . network: every protocol and port


def _subtract(
    networks: Iterable[ipaddress.IPv4Network], holes: Sequence[ipaddress.IPv4Network]
) -> list[ipaddress.IPv4Network]:
    pieces = list(networks)
    for hole in holes:
        kept: list[ipaddress.IPv4Network] = []
        for piece in pieces:
            if piece.subnet_of(hole):
                continue
            if hole.subnet_of(piece):
                kept.extend(piece.address_exclude(hole))
            else:
                kept.append(piece)
        pieces = kept
    return sorted(pieces)


def egress_elements(ifname: str, rules: Iterable[EgressRule]) -> EgressElements:
    """Set elements for `rules`, made disjoint: the kernel's interval sets refuse overlapping
    elements (10.0.0.0/8 and 10.1.0.0/16 on one port, or port 443 inside "every port").
    IPv6 rules are left out: instances have no IPv6, so they could never match."""
    every_port: dict[str, list[ipaddress.IPv4Network]] = {proto: [] for proto in _TRANSPORTS}
    by_port: dict[tuple[str, int], list[ipaddress.IPv4Network]] = {}
    any_protocol: list[ipaddress.IPv4Network] = []
    for rule in rules:
        network = ipaddress.ip_network(rule.cidr, strict=False)
        if not isinstance(network, ipaddress.IPv4Network):
            continue
        if rule.protocol == "any" and not rule.ports:
            any_protocol.append(network)
            continue
        for proto in _TRANSPORTS if rule.protocol == "any" else (rule.protocol,):
            if not rule.ports:
                every_port[proto].append(network)
            for port in rule.ports:
                by_port.setdefault((proto, port), []).append(network)
    wide = {proto: list(ipaddress.collapse_addresses(nets)) for proto, nets in every_port.items()}
    ports = [f'"{ifname}" . {net} . {proto} . 0-65535' for proto in _TRANSPORTS for net in wide[proto]]
    for (proto, port), nets in sorted(by_port.items()):
        ports += [
            f'"{ifname}" . {net} . {proto} . {port}'
            for net in _subtract(ipaddress.collapse_addresses(nets), wide[proto])
        ]
    hosts = [f'"{ifname}" . {net}' for net in ipaddress.collapse_addresses(any_protocol)]
    return EgressElements(ifname=ifname, ports=tuple(ports), hosts=tuple(hosts))


def egress_script(table: str, elements: EgressElements, *, remove: bool) -> str:
    """`nft -f` text that installs (or removes) one instance's allow-list in one transaction.
    Removal adds the elements first: adding an existing element is a no-op, so the deletes
    cannot fail on a half-installed list, and removal is idempotent (nft 1.0.6 has no `destroy`)."""
    groups = [
        ("allow_ports", elements.ports),
        ("allow_hosts", elements.hosts),
        ("restricted", (f'"{elements.ifname}"',)),
    ]
    adds = [f"add element inet {table} {name} {{ {', '.join(items)} }}" for name, items in groups if items]
    if not remove:
        return "\n".join(adds) + "\n"
    deletes = [line.replace("add element", "delete element", 1) for line in reversed(adds)]
    return "\n".join(adds + deletes) + "\n"


def prepare_scripts(naming: Naming, plan: SubnetPlan, slot: int) -> tuple[str, str]:
    """`ip -batch` text for the host side (creating the namespace too) and for inside it."""
    link, netns, gateway = naming.link(slot), naming.netns(slot), plan.gateway(slot)
    # addrgenmode none on both ends: no IPv6 address at all, not even link-local, so an instance
    # has no IPv6 path anywhere, not even to the host, and the IPv4 rules cannot be bypassed.
    host = (
        f"netns add {netns}\n"
        f"link add {link} type veth peer name eth0 netns {netns}\n"
        f"link set {link} addrgenmode none\n"
        f"addr add {gateway}/30 dev {link}\n"
        f"link set {link} up\n"
    )
    inside = (
        "link set lo up\n"
        "link set eth0 addrgenmode none\n"
        f"addr add {plan.address(slot)}/30 dev eth0\n"
        "link set eth0 up\n"
        f"route add default via {gateway}\n"
    )
    return host, inside


def teardown_script(naming: Naming, slot: int) -> str:
    # The veth is deleted explicitly rather than left to the namespace's (asynchronous) teardown:
    # a process still inside loses its network now, and the address is free once we return.
    return f"link del {naming.link(slot)}\nnetns del {naming.netns(slot)}\n"


# --- subprocesses -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    returncode: int
    stdout: str
    stderr: str


async def _run(argv: Sequence[str], script: str = "", *, timeout_s: float = _COMMAND_TIMEOUT_S) -> _Outcome:
    # posix_spawn, not asyncio's subprocesses: those fork the platform and stall its loop.
    try:
        result = await run_process(
            argv, input_bytes=script.encode() if script else None, env=_TOOL_ENV, timeout_s=timeout_s
        )
    except TimeoutError:  # before OSError, of which it is a subclass
        raise SandboxSpawnError(f"{' '.join(argv)} did not finish within {timeout_s:g}s") from None
    except OSError as exc:  # EAGAIN, ENOMEM, or the tool vanished since open
        raise SandboxSpawnError(f"cannot run {argv[0]}: {exc}") from exc
    return _Outcome(
        result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace").strip()
    )


async def _check(argv: Sequence[str], script: str = "") -> _Outcome:
    outcome = await _run(argv, script)
    if outcome.returncode != 0:
        raise SandboxSpawnError(f"{' '.join(argv)} failed with exit status {outcome.returncode}: {outcome.stderr}")
    return outcome


@dataclass(frozen=True, slots=True)
class _Tools:
    ip: str
    nft: str


def _find_tools() -> _Tools:
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        path = shutil.which(tool) or shutil.which(tool, path=_TOOL_ENV["PATH"])
        if path is None:
            missing.append(f"{tool!r} (apt-get install {package})")
        else:
            found[tool] = path
    if missing:
        raise SandboxUnavailableError(f"instance networking needs {' and '.join(missing)}")
    return _Tools(ip=found["ip"], nft=found["nft"])


def _check_capabilities() -> None:
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailableError(f"instance networking needs Linux network namespaces, not {sys.platform}")
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    effective = int(match.group(1), 16) if match else 0
    lacking = [
        name
        for name, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN))
        if not effective >> bit & 1
    ]
    if lacking:
        raise SandboxUnavailableError(f"instance networking needs {' and '.join(lacking)}: run hxb as root")


# Every platform's table name starts so (see hxb.sandbox.linux): how one platform sees others.
_TABLE_FAMILY_PREFIX = "hx"
IP_FORWARD_ORIGINAL = Path("/run/hxb/ip_forward.orig")


def _original_ip_forward() -> str:
    """The host's ip_forward before any hxb changed it: recorded by the first platform that
    opens, read by the others (which would otherwise see the first one's "1")."""
    try:
        return IP_FORWARD_ORIGINAL.read_text().strip()
    except FileNotFoundError:
        value = IP_FORWARD_SYSCTL.read_text().strip()
        IP_FORWARD_ORIGINAL.parent.mkdir(parents=True, exist_ok=True)
        IP_FORWARD_ORIGINAL.write_text(value + "\n")
        return value


async def _restore_ip_forward_if_last(tools: _Tools, own_table: str, original: str) -> None:
    """Several platforms may share the host (one per data dir): the last one out restores the
    host's own setting, which the first one in recorded."""
    tables = await _run([tools.nft, "list", "tables"])
    if any(
        line.split()[-1].startswith(_TABLE_FAMILY_PREFIX) and line.split()[-1] != own_table
        for line in tables.stdout.splitlines()
        if line.startswith("table inet ")
    ):
        return
    IP_FORWARD_SYSCTL.write_text(original + "\n")  # two small /proc and /run writes
    IP_FORWARD_ORIGINAL.unlink(missing_ok=True)  # noqa: ASYNC240


def _leftovers(naming: Naming) -> list[str]:
    found = [f"interface {name}" for _, name in socket.if_nameindex() if naming.owns_link(name)]
    if NETNS_DIR.is_dir():
        found += [f"namespace {name}" for name in sorted(os.listdir(NETNS_DIR)) if naming.owns_netns(name)]
    return found


def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _overlapping_routes(routes_json: str, subnet: ipaddress.IPv4Network) -> list[str]:
    overlapping: list[str] = []
    for route in json.loads(routes_json or "[]"):
        dst = route.get("dst", "")
        try:
            network = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue  # "default" and other words
        if network.prefixlen > 0 and network.overlaps(subnet):
            overlapping.append(f"{dst} dev {route.get('dev', '?')}")
    return overlapping


def _is_host_address(address: str) -> bool:
    # Binding succeeds only to an address of one of our own interfaces.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _read_dns(resolv_conf: Path) -> DnsConfig:
    try:
        dns = parse_resolv_conf(resolv_conf.read_text())
    except OSError:
        return DnsConfig(nameservers=(), unusable=())
    # A resolver on the host itself (dnsmasq on eth0's address, say) is behind the input drop.
    local = tuple(server for server in dns.nameservers if _is_host_address(server))
    usable = tuple(server for server in dns.nameservers if server not in local)
    return DnsConfig(nameservers=usable, unusable=dns.unusable + local)


def _check_gone(link: str, netns: str, stderr: str) -> None:
    remaining = [f"interface {link}"] if _link_exists(link) else []
    remaining += [f"namespace {netns}"] if (NETNS_DIR / netns).exists() else []
    if remaining:
        raise SandboxSpawnError(f"could not remove {' and '.join(remaining)}: {stderr}")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("instance network refill stopped", exc_info=task.exception())


# --- the manager --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lease:
    network: InstanceNetwork
    slot: int
    egress: EgressElements | None


@dataclass(frozen=True, slots=True)
class _Dirty:
    """A slot whose setup or teardown failed or was interrupted: its objects may exist or not."""

    slot: int
    egress: EgressElements | None


class NetworkManager:
    """Owns the instance subnet, our nftables table, the pool of prepared namespaces and every
    namespace handed out. One per platform process; `open()` it, `close()` it."""

    def __init__(
        self,
        *,
        naming: Naming,
        plan: SubnetPlan,
        tools: _Tools,
        dns: DnsConfig,
        prewarm: int,
        ip_forward_before: str,
    ) -> None:
        self._naming = naming
        self._plan = plan
        self._tools = tools
        self._dns = dns
        self._prewarm = prewarm
        self._ip_forward_before = ip_forward_before
        self._slots = SlotAllocator(plan.slots)
        self._prepared: deque[int] = deque()
        self._leases: dict[str, _Lease] = {}
        self._dirty: list[_Dirty] = []
        self._lease_ids = itertools.count(1)
        self._created = 0
        self._released = 0
        self._closed = False
        self._refill_wanted = asyncio.Event()
        self._pool_full = asyncio.Event()
        self._running = 0  # acquire() and release() calls under way; close() waits for them
        self._quiet = asyncio.Event()
        self._quiet.set()
        # A plain task rather than a TaskGroup: a TaskGroup cancels the task that entered it when
        # a child fails, and that would be whoever called open(). close() cancels and awaits it.
        self._refill_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        *,
        subnet: str = "10.213.0.0/16",
        prewarm: int = 4,
        name_prefix: str = "hxb",
        resolv_conf: Path = RESOLV_CONF,
    ) -> NetworkManager:
        """Checks the host, installs our table and turns forwarding on; the pool fills in the
        background (`wait_prewarmed()` waits for it).

        Raises:
            ConfigError: a bad subnet, prefix or prewarm count.
            SandboxUnavailableError: a missing tool or privilege, leftovers of an earlier run, a
                subnet the host already routes, or a kernel without the nftables features we use.
        """
        plan = SubnetPlan.parse(subnet)
        naming = Naming.parse(name_prefix, slots=plan.slots)
        if not 0 <= prewarm <= plan.slots:
            raise ConfigError(f"network prewarm count {prewarm} must be between 0 and {plan.slots}, the subnet's size")
        _check_capabilities()
        tools = _find_tools()
        leftovers = _leftovers(naming)
        if leftovers:
            raise SandboxUnavailableError(
                f"leftovers of an earlier hxb with prefix {name_prefix!r}: {', '.join(leftovers[:5])}; "
                "if no other hxb runs on this host, NetworkManager.cleanup_stale() removes them"
            )
        routes = await _check([tools.ip, "-j", "-4", "route", "show", "table", "all"])
        overlapping = _overlapping_routes(routes.stdout, plan.network)
        if overlapping:
            raise SandboxUnavailableError(
                f"the host already routes into instance subnet {subnet}: {'; '.join(overlapping[:3])}; "
                "choose another subnet"
            )
        dns = _read_dns(resolv_conf)
        ip_forward_before = _original_ip_forward()
        ruleset = render_ruleset(
            naming=naming,
            subnet=plan.network,
            nameservers=dns.nameservers,
            blocked=BLOCKED_DESTINATIONS,
            host_was_router=ip_forward_before != "0",
        )
        loaded = await _run([tools.nft, "-f", "-"], ruleset)
        if loaded.returncode != 0:
            hint = (
                "; another hxb runs with this prefix, or one was killed (NetworkManager.cleanup_stale())"
                if "File exists" in loaded.stderr
                else ""
            )
            raise SandboxUnavailableError(f"nft could not install table inet {naming.table}: {loaded.stderr}{hint}")
        try:
            IP_FORWARD_SYSCTL.write_text("1\n")
        except OSError as exc:
            await _run([tools.nft, "delete", "table", "inet", naming.table])
            raise SandboxUnavailableError(f"cannot turn on IPv4 forwarding ({IP_FORWARD_SYSCTL}): {exc}") from exc
        manager = cls(
            naming=naming, plan=plan, tools=tools, dns=dns, prewarm=prewarm, ip_forward_before=ip_forward_before
        )
        manager._refill_task = asyncio.create_task(manager._refill_forever(), name=f"{naming.prefix}-network-refill")
        manager._refill_task.add_done_callback(_log_crash)
        manager._wake_refill()
        log.info("instance network open", extra={"subnet": subnet, "table": naming.table, "prewarm": prewarm})
        return manager

    # --- handing out ----------------------------------------------------------------------------

    async def acquire(self, egress: Sequence[EgressRule] | None) -> InstanceNetwork:
        """A configured namespace for one instance. `egress` None: outbound is unrestricted; a
        list (even empty): only those destinations, plus DNS to the nameservers.

        From the pool this costs no subprocess without an allow-list and one `nft` run with one;
        with the pool empty it prepares a namespace now (two `ip` runs).
        """
        if self._closed:
            raise SandboxUnavailableError("the instance network manager is closed")
        with self._operation():
            return await self._acquire(egress)

    async def _acquire(self, egress: Sequence[EgressRule] | None) -> InstanceNetwork:
        if self._prepared:
            slot = self._prepared.popleft()
            self._wake_refill()
        else:
            self._wake_refill()
            slot = await self._prepare()
        ifname = self._naming.link(slot)
        elements = None
        if egress is not None:
            elements = egress_elements(ifname, egress)
            try:
                await _check([self._tools.nft, "-f", "-"], egress_script(self._naming.table, elements, remove=False))
            except BaseException:
                self._quarantine(slot, elements)
                raise
        if self._is_closed():  # close() ran while we waited: it could not see this slot
            await self._destroy(slot, None)  # the table went with close(), and its elements with it
            raise SandboxUnavailableError("the instance network manager is closed")
        network = InstanceNetwork(
            netns_path=NETNS_DIR / self._naming.netns(slot),
            address=self._plan.address(slot),
            gateway=self._plan.gateway(slot),
            host_ifname=ifname,
            nameservers=self._dns.nameservers,
            lease_id=next(self._lease_ids),
        )
        self._leases[ifname] = _Lease(network, slot, elements)
        return network

    async def release(self, network: InstanceNetwork) -> None:
        """Removes the instance's allow-list, its veth and its namespace. Idempotent: a second
        release, or one of an older lease of the same slot, does nothing."""
        lease = self._leases.get(network.host_ifname)
        if lease is None or lease.network.lease_id != network.lease_id:
            return
        del self._leases[network.host_ifname]
        with self._operation():
            await self._destroy(lease.slot, lease.egress)

    async def wait_prewarmed(self) -> None:
        """Returns once the pool holds `prewarm` prepared namespaces."""
        await self._pool_full.wait()

    # --- preparing and destroying ---------------------------------------------------------------

    async def _prepare(self) -> int:
        slot = self._slots.take()
        host, inside = prepare_scripts(self._naming, self._plan, slot)
        try:
            await _check([self._tools.ip, "-batch", "-"], host)
            await _check([self._tools.ip, "-n", self._naming.netns(slot), "-batch", "-"], inside)
        except BaseException:
            self._quarantine(slot, None)
            raise
        self._created += 1
        return slot

    async def _destroy(self, slot: int, egress: EgressElements | None) -> None:
        """Removes a slot's objects, whichever of them exist; the slot is reused only once they
        are all gone. Raises SandboxSpawnError (and quarantines the slot) when some remain."""
        link, netns = self._naming.link(slot), self._naming.netns(slot)
        try:
            if egress is not None:
                await _check([self._tools.nft, "-f", "-"], egress_script(self._naming.table, egress, remove=True))
            # -force: go on past objects that are already gone; what counts is what remains.
            outcome = await _run([self._tools.ip, "-force", "-batch", "-"], teardown_script(self._naming, slot))
            _check_gone(link, netns, outcome.stderr)
        except BaseException:
            self._quarantine(slot, egress)
            raise
        self._slots.give_back(slot)
        self._released += 1
        self._wake_refill()  # the pool may have stopped short for want of a free slot

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        self._running += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._quiet.set()

    def _is_closed(self) -> bool:
        # A call, not the attribute: mypy would keep the narrowing from before our awaits.
        return self._closed

    def _quarantine(self, slot: int, egress: EgressElements | None) -> None:
        self._dirty.append(_Dirty(slot, egress))
        self._wake_refill()

    def _wake_refill(self) -> None:
        if len(self._prepared) >= self._prewarm:
            self._pool_full.set()
        else:
            self._pool_full.clear()
        self._refill_wanted.set()

    async def _refill_forever(self) -> None:
        loop = asyncio.get_running_loop()
        retry_at = 0.0
        while True:
            await self._refill_wanted.wait()
            self._refill_wanted.clear()
            # Rate-limited: a failed cleanup re-quarantines its slot, which wakes us again.
            if self._dirty and loop.time() >= retry_at:
                retry_at = loop.time() + _REFILL_BACKOFF_S
                await self._retry_quarantined()
            try:
                # One at a time: the pool is refilled with spare CPU, not at cold starts' expense.
                # With every slot taken it waits for a release rather than fail.
                while len(self._prepared) < self._prewarm and self._slots.available:
                    self._prepared.append(await self._prepare())
                    self._wake_refill()
            except SandboxSpawnError as exc:
                log.warning("preparing an instance network failed, retrying", extra={"error": str(exc)})
                await asyncio.sleep(_REFILL_BACKOFF_S)
                self._refill_wanted.set()

    async def _retry_quarantined(self) -> None:
        dirty, self._dirty = self._dirty, []
        for entry in dirty:
            try:
                await self._destroy(entry.slot, entry.egress)
            except SandboxSpawnError as exc:  # _destroy has put it back in quarantine
                log.warning(
                    "cleaning up an instance network failed, retrying later",
                    extra={"slot": entry.slot, "error": str(exc)},
                )

    # --- closing and cleaning up ----------------------------------------------------------------

    async def close(self) -> None:
        """Removes every namespace (in use or not), deletes our table and restores forwarding.
        Goes on past failures and raises the first one at the end."""
        if self._closed:
            return
        self._closed = True
        results: list[BaseException | None] = []
        if self._refill_task is not None:
            self._refill_task.cancel()
            (outcome,) = await asyncio.gather(self._refill_task, return_exceptions=True)
            if not isinstance(outcome, asyncio.CancelledError):
                results.append(outcome)
        # A release under way would race our table deletion, and an acquire under way holds a
        # slot we cannot see: let them finish (an acquire then undoes its own, seeing us closed).
        await self._quiet.wait()
        slots = [(lease.slot, lease.egress) for lease in self._leases.values()]
        slots += [(slot, None) for slot in self._prepared]
        slots += [(entry.slot, entry.egress) for entry in self._dirty]
        self._leases.clear()
        self._prepared.clear()
        self._dirty = []
        results += await asyncio.gather(
            *(self._destroy(slot, egress) for slot, egress in slots), return_exceptions=True
        )
        deleted = await _run([self._tools.nft, "delete", "table", "inet", self._naming.table])
        if deleted.returncode != 0:
            results.append(SandboxSpawnError(f"nft could not delete table inet {self._naming.table}: {deleted.stderr}"))
        try:
            await _restore_ip_forward_if_last(self._tools, self._naming.table, self._ip_forward_before)
        except OSError as exc:
            results.append(exc)
        failures = [result for result in results if result is not None]
        for failure in failures:
            log.error("closing the instance network failed", extra={"error": str(failure)})
        if failures:
            raise failures[0]

    @staticmethod
    async def cleanup_stale(name_prefix: str = "hxb") -> int:
        """Removes what a killed platform left: our table, and the interfaces and namespaces
        named with `name_prefix`. Only call it when no platform with that prefix runs. When no
        other platform's table is left, forwarding gets back the host's own setting. Returns
        how many objects were removed."""
        naming = Naming.parse(name_prefix, slots=1)
        _check_capabilities()
        tools = _find_tools()
        removed = 0
        tables = await _check([tools.nft, "list", "tables"])
        if f"table inet {naming.table}" in tables.stdout.splitlines():
            await _check([tools.nft, "delete", "table", "inet", naming.table])
            removed += 1
        try:
            recorded: str | None = IP_FORWARD_ORIGINAL.read_text().strip()  # noqa: ASYNC240
        except FileNotFoundError:
            recorded = None
        if recorded is not None:
            await _restore_ip_forward_if_last(tools, naming.table, recorded)
        links = [name for _, name in socket.if_nameindex() if naming.owns_link(name)]
        namespaces = sorted(n for n in os.listdir(NETNS_DIR) if naming.owns_netns(n)) if NETNS_DIR.is_dir() else []
        script = "".join(f"link del {name}\n" for name in links) + "".join(f"netns del {n}\n" for n in namespaces)
        if script:
            outcome = await _run([tools.ip, "-force", "-batch", "-"], script)
            remaining = [name for name in links if _link_exists(name)]
            remaining += [n for n in namespaces if (NETNS_DIR / n).exists()]
            if remaining:
                raise SandboxUnavailableError(f"could not remove {', '.join(remaining[:5])}: {outcome.stderr}")
            removed += len(links) + len(namespaces)
        return removed

    # --- reporting ------------------------------------------------------------------------------

    def statistics(self) -> NetworkStatistics:
        return NetworkStatistics(
            prepared=len(self._prepared),
            in_use=len(self._leases),
            created=self._created,
            released=self._released,
            quarantined=len(self._dirty),
        )

    def describe(self) -> dict[str, object]:
        """What `hxb doctor` shows about instance networking."""
        stats = self.statistics()
        return {
            "isolation": "network namespace per instance, veth to the host, NAT (masquerade) outbound",
            "subnet": str(self._plan.network),
            "capacity": self._plan.slots,
            "nftables_table": f"inet {self._naming.table}",
            "ip_forward": {"before": self._ip_forward_before, "now": "0" if self._closed else "1"},
            "host_reachable_from_instances": False,
            "instances_reachable_from_outside": False,
            "blocked_destinations": list(BLOCKED_DESTINATIONS),
            "ipv6": "none in instances (no addresses, not even link-local; IPv6 allow-list rules are ignored)",
            "nameservers": list(self._dns.nameservers),
            "dns": self._dns.note,
            "tools": {"ip": self._tools.ip, "nft": self._tools.nft},
            "prewarm": self._prewarm,
            "statistics": {
                "prepared": stats.prepared,
                "in_use": stats.in_use,
                "created": stats.created,
                "released": stats.released,
                "quarantined": stats.quarantined,
            },
        }
