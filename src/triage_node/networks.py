"""Source addresses and the network allow-lists every listener checks (DICOM, HL7, STOW-RS,
the web interface): one parser, one rule.

An empty list allows every address. An address that does not parse (a Unix socket, a zone the
platform added) is never inside a list, so a non-empty list refuses it. IPv4-mapped IPv6
addresses (``::ffff:10.0.0.5``, what a dual-stack socket reports) are compared as IPv4.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def source_ip(address: str) -> IPAddress | None:
    """The peer's address as an IP address, or None when it is not one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(networks: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``10.0.0.0/8``-style strings as networks (host bits allowed: ``10.1.2.3/8`` is 10/8)."""
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


class AllowedNetworks:
    """The networks a listener accepts connections from; empty = everyone."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = parse_networks(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, address: str) -> bool:
        """Whether *address* lies in one of the networks (False for an empty list)."""
        ip = source_ip(address)
        return ip is not None and any(ip in network for network in self.networks)

    def allows(self, address: str) -> bool:
        """Whether a connection from *address* is accepted."""
        return not self.networks or self.contains(address)
