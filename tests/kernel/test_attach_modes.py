"""Attach in each XDP mode, read the mode back, detach for real."""

from __future__ import annotations

import os

import pytest

from tidegate.kernel import FilterConfig, KernelFilter
from tidegate.labnet import VethLab
from tidegate.ruleset import parse_rule_set


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_attach_reports_mode_and_detach_removes_it(mode):
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF and network namespaces")
    tag = f"m{mode[0]}{os.getpid() % 10000}"
    with VethLab(tag, subnet="10.211.1") as lab:
        kf = KernelFilter(FilterConfig(interface=lab.host_if, pin_name=f"test-mode-{tag}", xdp_mode=mode))
        kf.load()
        try:
            kf.apply(parse_rule_set("rules: []\n"), 1)
            assert kf.attach() == mode
            st = kf.state()
            assert st.attached and st.mode == mode
            kf.detach(remove_pins=True)
            assert kf._attached_prog() == (None, None), "detach left the program attached"
            assert not os.path.exists(kf.config.pin_dir)
        finally:
            kf.detach(remove_pins=True)
            kf.close()
