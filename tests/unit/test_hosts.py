"""AETR_ALLOWED_STEP_HOSTS: what it accepts, and which step URLs it lets be stored."""

from __future__ import annotations

import ipaddress

import pytest

from aetr.config import ConfigError, Settings
from aetr.domain.hosts import AllowedHosts, address_of


def test_the_setting_lists_names_addresses_and_ranges() -> None:
    allowed = Settings.from_env({"AETR_ALLOWED_STEP_HOSTS": " Catalog.internal. , 10.0.0.0/8,::1 ,192.168.1.7,"})
    assert allowed.allowed_step_hosts == AllowedHosts(
        frozenset({"catalog.internal"}),
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"), ipaddress.ip_network("192.168.1.7/32")))
    assert Settings.from_env({}).allowed_step_hosts is None
    assert Settings.from_env({"AETR_ALLOWED_STEP_HOSTS": " "}).allowed_step_hosts is None


@pytest.mark.parametrize(("value", "says"), [
    ("10.0.0.0/33", "not an IP address or CIDR range"),
    ("10.0.0.1/8", "has host bits set"),
    ("10.0.0.256", "not a valid IP address"),
    ("host name", "not a host name"),
    ("host:8080", "not an IP address or CIDR range"),
    ("bücher.example", "xn--"),
    (",", "lists no host"),
])
def test_an_entry_aetr_cannot_read_stops_the_server_from_starting(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match="AETR_ALLOWED_STEP_HOSTS") as refused:
        Settings.from_env({"AETR_ALLOWED_STEP_HOSTS": value})
    assert says in str(refused.value)


def test_a_url_host_may_be_stored_when_listed_by_name_or_within_a_range() -> None:
    allowed = AllowedHosts.parse("catalog,10.0.0.0/8,fd00::/8")
    for host in ("catalog", "CATALOG", "catalog.", "10.1.2.3", "::ffff:10.1.2.3", "fd00::5"):
        assert allowed.url_host_problem(host) is None, host
    # A name not listed: ranges are listed, so it is judged by the addresses it resolves to, when called.
    assert allowed.url_host_problem("other.example") is None
    problem = allowed.url_host_problem("127.0.0.1")
    assert problem is not None and "'127.0.0.1' is not within AETR_ALLOWED_STEP_HOSTS" in problem


def test_with_names_alone_only_those_names_may_be_stored() -> None:
    allowed = AllowedHosts.parse("catalog")
    assert allowed.url_host_problem("catalog") is None
    for host in ("other.example", "catalog.example", "10.0.0.1"):
        assert allowed.url_host_problem(host) is not None, host


def test_addresses_are_read_as_the_network_sees_them() -> None:
    assert address_of("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert address_of("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert address_of("catalog") is None
