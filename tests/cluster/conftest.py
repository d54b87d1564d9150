"""The cluster tests' fixture: a second "host" (tests/support/cluster.py network_namespace)."""

from __future__ import annotations

import pytest

from tests.support.cluster import network_namespace


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: a second "host" at NS_PEER that
    reaches this one at NS_HOST. Skipped with the kernel's answer when it refuses (no root,
    no CAP_NET_ADMIN, no netns support). Deleted in the end, whatever happened."""
    with network_namespace() as ns:
        yield ns
