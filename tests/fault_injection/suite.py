"""Suite: the baseline and kill points (base), with every kind of scenario."""
from __future__ import annotations

from fault_injection.base import SuiteBase
from fault_injection.concurrent import Concurrent
from fault_injection.damage import Damage
from fault_injection.hardening import Hardening
from fault_injection.resource import ResourceFaults


class Suite(ResourceFaults, Hardening, Damage, Concurrent, SuiteBase):
    """Every scenario of the fault suite on one work folder, data cache and seed."""
