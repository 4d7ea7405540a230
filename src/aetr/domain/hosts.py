"""Which hosts api steps may call: the allow-list of AETR_ALLOWED_STEP_HOSTS (names, addresses, CIDR ranges)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

SETTING: Final = "AETR_ALLOWED_STEP_HOSTS"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A DNS name: dot-separated labels of letters, digits, '-' (and '_', which container service names use).
_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def address_of(host: str) -> IPAddress | None:
    """The address a URL's host is written as (IPv4-mapped IPv6 as IPv4, zone ignored), or None for a name."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class AllowedHosts:
    """Host names (matched whole, ignoring case) and address ranges that api steps may call."""

    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @staticmethod
    def parse(text: str) -> AllowedHosts:
        """The allow-list a comma-separated setting describes; ValueError naming an entry AETR cannot read."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if "/" in entry or ":" in entry or address_of(entry) is not None:
                try:
                    networks.append(ipaddress.ip_network(entry))
                except ValueError as exc:
                    raise ValueError(f"{entry!r} is not an IP address or CIDR range: {exc}") from None
                continue
            name = entry.rstrip(".")
            if not name.isascii() or _NAME.fullmatch(name) is None or len(name) > 253:
                raise ValueError(f"{entry!r} is not a host name, IP address or CIDR range (write international "
                                 "names in their xn-- form)")
            if name.rpartition(".")[2].isdigit():
                raise ValueError(f"{entry!r} is not a valid IP address, and a host name cannot end in digits")
            names.add(name)
        if not names and not networks:
            raise ValueError("lists no host: leave it unset to allow any host")
        return AllowedHosts(frozenset(names), tuple(networks))

    def __str__(self) -> str:
        return ",".join([*sorted(self.names), *map(str, self.networks)])

    def lists_name(self, host: str) -> bool:
        """Whether `host` (a URL's host, as yarl encodes it) is listed by name."""
        return host.rstrip(".").lower() in self.names

    def covers(self, address: IPAddress) -> bool:
        """Whether an address lies within a listed address or range."""
        return any(address in network for network in self.networks)

    def url_host_problem(self, host: str) -> str | None:
        """Why a step URL with this host may not be stored, or None when it may.

        A name that is not listed may be stored when ranges are listed: whether it resolves into one can only
        be told when the step is called, and is checked then.
        """
        if self.lists_name(host):
            return None
        address = address_of(host)
        if address is not None:
            return None if self.covers(address) else f"'{host}' is not within {SETTING} ({self})"
        return None if self.networks else f"'{host}' is not listed in {SETTING} ({self})"

    def refusal(self, host: str, addresses: Iterable[str]) -> str:
        """Why a name is not called when none of the addresses it resolved to is within the allow-list."""
        return (f"'{host}' resolves to {', '.join(addresses) or 'no address'}, none of them within {SETTING} "
                f"({self})")
