"""The one allow-list rule every listener uses."""

from __future__ import annotations

import pytest

from triage_node.networks import AllowedNetworks, source_ip


def test_an_empty_list_allows_everyone_but_contains_no_one() -> None:
    allowed = AllowedNetworks()
    assert not allowed
    assert allowed.allows("203.0.113.9")
    assert not allowed.contains("203.0.113.9")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # what a dual-stack socket reports for an IPv4 peer
        ("fe80::1%eth0", False),  # a zone does not make an address unparsable
        ("10.2.0.1", False),
        ("not an address", False),
        ("", False),
    ],
)
def test_a_list_allows_only_its_networks(address: str, expected: bool) -> None:
    allowed = AllowedNetworks(["10.1.0.0/16", "2001:db8::/32"])
    assert allowed.allows(address) is expected


def test_host_bits_in_a_network_are_ignored() -> None:
    assert AllowedNetworks(["192.168.7.7/24"]).allows("192.168.7.200")


def test_source_ip_unmaps_ipv4_mapped_ipv6() -> None:
    assert str(source_ip("::ffff:127.0.0.1")) == "127.0.0.1"
    assert source_ip("fe80::1%lo") is not None
    assert source_ip("localhost") is None
