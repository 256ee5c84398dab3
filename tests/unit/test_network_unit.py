"""The pure parts of instance networking: names, address plan, slot recycling, resolv.conf,
and the nftables / ip text we generate. No root, no processes."""

from __future__ import annotations

import ipaddress

import pytest

from hxb.errors import ConfigError, InternalError, SandboxSpawnError
from hxb.sandbox.network import (
    DnsConfig,
    Naming,
    SlotAllocator,
    SubnetPlan,
    egress_elements,
    egress_script,
    parse_resolv_conf,
    prepare_scripts,
    render_ruleset,
    teardown_script,
)
from hxb.spec import EgressRule

# --- subnet plan and names ---------------------------------------------------------------------


def test_subnet_plan_cuts_slash_30_slots() -> None:
    plan = SubnetPlan.parse("10.213.0.0/16")

    assert plan.slots == 16384
    assert (plan.gateway(0), plan.address(0)) == ("10.213.0.1", "10.213.0.2")
    assert (plan.gateway(1), plan.address(1)) == ("10.213.0.5", "10.213.0.6")
    assert (plan.gateway(16383), plan.address(16383)) == ("10.213.255.253", "10.213.255.254")


@pytest.mark.parametrize("subnet", ["10.213.0.1/16", "fd00::/64", "10.213.0.0/31", "nonsense"])
def test_subnet_plan_rejects_bad_subnet(subnet: str) -> None:
    with pytest.raises(ConfigError, match="subnet"):
        SubnetPlan.parse(subnet)


def test_naming_builds_names_from_prefix() -> None:
    naming = Naming.parse("hxb", slots=16384)

    assert (naming.link(7), naming.netns(7), naming.table, naming.link_wildcard) == ("hxbv7", "hxb-7", "hxb", "hxbv*")


def test_naming_owns_only_its_own_pattern() -> None:
    naming = Naming.parse("hxb", slots=4)

    assert naming.owns_link("hxbv12")
    assert naming.owns_netns("hxb-12")
    for foreign in ("hxbtv1", "hxbv", "hxbv1x", "xhxbv1", "eth0"):
        assert not naming.owns_link(foreign)
    for foreign in ("hxbtest-srv", "hxbt-1", "hxb-", "hxb-1-2"):
        assert not naming.owns_netns(foreign)


@pytest.mark.parametrize("prefix", ["", "Hxb", "1hxb", "hxb-x", "toolongprefix"])
def test_naming_rejects_bad_prefix(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        Naming.parse(prefix, slots=4)


def test_naming_rejects_interface_names_over_the_kernel_limit() -> None:
    with pytest.raises(ConfigError, match="longer than 15"):
        Naming.parse("abcdefgh", slots=2**22)  # "abcdefghv4194303" is 16 characters


# --- slot recycling -----------------------------------------------------------------------------


def test_slots_unused_first_then_least_recently_freed() -> None:
    slots = SlotAllocator(3)
    a, b, c = slots.take(), slots.take(), slots.take()
    slots.give_back(b)
    slots.give_back(a)

    assert (a, b, c) == (0, 1, 2)
    assert [slots.take(), slots.take()] == [1, 0]
    assert slots.taken == 3


def test_freed_slot_waits_behind_unused_ones() -> None:
    slots = SlotAllocator(3)
    first = slots.take()
    slots.give_back(first)

    assert [slots.take(), slots.take(), slots.take()] == [1, 2, 0]


def test_slots_exhausted_raises() -> None:
    slots = SlotAllocator(1)
    slots.take()

    with pytest.raises(SandboxSpawnError, match="all 1 instance network slots are in use"):
        slots.take()


def test_slot_never_taken_cannot_be_given_back() -> None:
    slots = SlotAllocator(2)
    slot = slots.take()
    slots.give_back(slot)

    with pytest.raises(InternalError):
        slots.give_back(slot)


# --- resolv.conf --------------------------------------------------------------------------------


def test_resolv_conf_keeps_reachable_ipv4_nameservers() -> None:
    dns = parse_resolv_conf(
        "# comment\nsearch example\nnameserver 10.255.255.53\nnameserver 127.0.0.53\n"
        "nameserver fd00::1\nnameserver 10.255.255.53\nnameserver bogus\n"
    )

    assert dns == DnsConfig(nameservers=("10.255.255.53",), unusable=("127.0.0.53", "fd00::1"))
    assert dns.note == "instances use the host's nameservers"


def test_resolv_conf_with_only_loopback_resolvers_says_so() -> None:
    dns = parse_resolv_conf("nameserver 127.0.0.53\noptions edns0\n")

    assert dns.nameservers == ()
    assert "instances have no DNS" in dns.note
    assert "127.0.0.53" in dns.note


# --- egress allow-lists -------------------------------------------------------------------------


def _elements(*rules: EgressRule) -> tuple[tuple[str, ...], tuple[str, ...]]:
    elements = egress_elements("hxbv3", rules)
    return elements.ports, elements.hosts


def test_egress_rule_with_ports_gives_one_element_per_port() -> None:
    ports, hosts = _elements(EgressRule(cidr="10.214.0.2/32", ports=[8080, 443]))

    assert ports == ('"hxbv3" . 10.214.0.2/32 . tcp . 443', '"hxbv3" . 10.214.0.2/32 . tcp . 8080')
    assert hosts == ()


def test_egress_rule_without_ports_allows_every_port() -> None:
    ports, _ = _elements(EgressRule(cidr="192.0.2.0/24", protocol="udp"))

    assert ports == ('"hxbv3" . 192.0.2.0/24 . udp . 0-65535',)


def test_egress_any_protocol() -> None:
    assert _elements(EgressRule(cidr="192.0.2.0/24", protocol="any")) == ((), ('"hxbv3" . 192.0.2.0/24',))
    assert _elements(EgressRule(cidr="192.0.2.0/24", ports=[53], protocol="any"))[0] == (
        '"hxbv3" . 192.0.2.0/24 . tcp . 53',
        '"hxbv3" . 192.0.2.0/24 . udp . 53',
    )


def test_egress_overlapping_networks_are_merged() -> None:
    ports, _ = _elements(
        EgressRule(cidr="10.0.0.0/8", ports=[443]),
        EgressRule(cidr="10.1.0.0/16", ports=[443]),
        EgressRule(cidr="10.0.0.0/8", ports=[443]),
    )

    assert ports == ('"hxbv3" . 10.0.0.0/8 . tcp . 443',)


def test_egress_port_inside_every_port_rule_is_dropped_or_cut() -> None:
    ports, _ = _elements(
        EgressRule(cidr="10.1.0.0/16"),  # every port
        EgressRule(cidr="10.1.2.0/24", ports=[443]),  # inside it: redundant
        EgressRule(cidr="10.0.0.0/8", ports=[443]),  # around it: cut so the intervals stay disjoint
    )

    every = [p for p in ports if p.endswith("0-65535")]
    on_443 = [p.split(" . ")[1] for p in ports if p.endswith(". 443")]
    assert every == ['"hxbv3" . 10.1.0.0/16 . tcp . 0-65535']
    pieces = [ipaddress.ip_network(n) for n in on_443]
    assert not any(n.overlaps(ipaddress.ip_network("10.1.0.0/16")) for n in pieces)
    covered = sum(n.num_addresses for n in pieces) + 2**16
    assert covered == 2**24  # together they still cover the whole /8
    assert all(a == b or not a.overlaps(b) for a in pieces for b in pieces)


def test_egress_ipv6_rules_are_ignored() -> None:
    assert _elements(EgressRule(cidr="2001:db8::/32", ports=[443])) == ((), ())


def test_egress_script_adds_in_one_transaction() -> None:
    elements = egress_elements("hxbv3", [EgressRule(cidr="10.214.0.2/32", ports=[8080])])

    assert egress_script("hxb", elements, remove=False) == (
        'add element inet hxb allow_ports { "hxbv3" . 10.214.0.2/32 . tcp . 8080 }\n'
        'add element inet hxb restricted { "hxbv3" }\n'
    )


def test_egress_script_removal_is_idempotent() -> None:
    elements = egress_elements("hxbv3", [EgressRule(cidr="10.214.0.2/32", ports=[8080])])

    lines = egress_script("hxb", elements, remove=True).splitlines()

    assert lines == [
        'add element inet hxb allow_ports { "hxbv3" . 10.214.0.2/32 . tcp . 8080 }',
        'add element inet hxb restricted { "hxbv3" }',
        'delete element inet hxb restricted { "hxbv3" }',
        'delete element inet hxb allow_ports { "hxbv3" . 10.214.0.2/32 . tcp . 8080 }',
    ]


def test_empty_allow_list_still_restricts() -> None:
    elements = egress_elements("hxbv3", [])

    assert egress_script("hxb", elements, remove=False) == 'add element inet hxb restricted { "hxbv3" }\n'


# --- ruleset and ip scripts ---------------------------------------------------------------------


def _ruleset(*, nameservers: tuple[str, ...] = ("10.255.255.53",), host_was_router: bool = False) -> str:
    return render_ruleset(
        naming=Naming.parse("hxb", slots=4),
        subnet=ipaddress.IPv4Network("10.213.0.0/16"),
        nameservers=nameservers,
        blocked=("169.254.0.0/16",),
        host_was_router=host_was_router,
    )


def test_ruleset_creates_its_own_table_atomically() -> None:
    text = _ruleset()

    assert text.startswith("create table inet hxb\ntable inet hxb {\n")
    assert 'ip saddr 10.213.0.0/16 oifname != "hxbv*" masquerade' in text
    assert "elements = { 10.255.255.53 }" in text
    assert "ip daddr { 169.254.0.0/16 } counter drop" in text


def test_ruleset_drops_to_host_and_into_instances_except_replies() -> None:
    text = _ruleset()

    for chain, direction in (("input", "iifname"), ("output", "oifname"), ("forward", "oifname")):
        body = text.split(f"chain {chain} {{", 1)[1].split("}", 1)[0]
        accept = f'{direction} "hxbv*" ct state established,related accept'
        drop = f'{direction} "hxbv*" counter drop'
        assert accept in body
        assert drop in body
        assert body.index(accept) < body.index(drop)


def test_ruleset_keeps_a_non_router_host_from_routing() -> None:
    assert "the host was not a router before hxb" in _ruleset(host_was_router=False)
    assert "the host was not a router before hxb" not in _ruleset(host_was_router=True)


def test_ruleset_without_nameservers_has_an_empty_set() -> None:
    assert "elements" not in _ruleset(nameservers=())


def test_prepare_and_teardown_scripts() -> None:
    naming = Naming.parse("hxb", slots=16384)
    host, inside = prepare_scripts(naming, SubnetPlan.parse("10.213.0.0/16"), 2)

    assert host.splitlines() == [
        "netns add hxb-2",
        "link add hxbv2 type veth peer name eth0 netns hxb-2",
        "link set hxbv2 addrgenmode none",
        "addr add 10.213.0.9/30 dev hxbv2",
        "link set hxbv2 up",
    ]
    assert inside.splitlines() == [
        "link set lo up",
        "link set eth0 addrgenmode none",
        "addr add 10.213.0.10/30 dev eth0",
        "link set eth0 up",
        "route add default via 10.213.0.9",
    ]
    assert teardown_script(naming, 2) == "link del hxbv2\nnetns del hxb-2\n"


def test_slots_available_counts_down_and_up() -> None:
    slots = SlotAllocator(2)
    slot = slots.take()
    assert slots.available == 1
    slots.give_back(slot)
    assert slots.available == 2
