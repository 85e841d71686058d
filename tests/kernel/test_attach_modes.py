"""Attach in each XDP mode, read the mode back, detach for real."""

from __future__ import annotations

import logging
import os
import sys
import threading

import pytest
from pyroute2 import IPRoute

from tidegate.kernel import bpfsys, program
from tidegate.kernel.filter import FilterConfig, KernelFilter
from tidegate.lab.veth import VethLab
from tidegate.ruleset.parse import parse_rule_set


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_attach_reports_mode_and_detach_removes_it(mode):
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


@pytest.mark.kernel
def test_restart_adopts_the_same_program_without_compiling_and_a_changed_one_replaces_it(monkeypatch, caplog):
    """BCC never runs in the agent: a compile is a child process, and a new
    agent that finds the program of the same digest pinned and attached
    adopts it without one. A changed program is compiled (in a child) and
    swapped in with one atomic replace: the interface is never without a
    program, the pinned maps (and so the active rule set and per-source
    state) are the same objects, and the replaced program's pin is gone."""
    caplog.set_level(logging.INFO, logger="tidegate.kernel.filter")
    tag = f"rp{os.getpid() % 10000}"
    with VethLab(tag, subnet="10.211.3") as lab:
        cfg = FilterConfig(interface=lab.host_if, pin_name=f"test-replace-{tag}", xdp_mode="native")
        old = KernelFilter(cfg)
        first = old.load()
        new = None
        try:
            assert first.compiled and "bcc" not in sys.modules, "compiled in a child, not in this process"
            old.apply(parse_rule_set("deny: ['192.0.2.0/24']\n"), 7)
            old.attach()
            old_id, _ = old._attached_prog()
            map_ids = _pinned_map_ids(cfg.pin_dir)
            old.close()

            # the same program: adopted from its pin, no compile child may run
            compiles: list = []
            real_compile = program.compile_in_child
            monkeypatch.setattr(program, "compile_in_child", lambda *a: compiles.append(a) or real_compile(*a))
            caplog.clear()
            same = KernelFilter(cfg)
            res = same.load()
            try:
                assert compiles == [] and not res.compiled, "a restart with the same program attached compiled"
                assert "compiling the program in a child process" not in caplog.text
                assert "program found pinned: not compiling" in caplog.text
                assert res.adopted and not res.replaced and res.prog_id == old_id == same._attached_prog()[0]
                assert same.active_version() == 7 and _pinned_map_ids(cfg.pin_dir) == map_ids
            finally:
                same.close()

            seen: list = []
            stop = threading.Event()

            def watch():
                with IPRoute() as ipr:
                    idx = ipr.link_lookup(ifname=lab.host_if)[0]
                    while not stop.is_set():
                        xdp = ipr.get_links(idx)[0].get_attr("IFLA_XDP")
                        seen.append(xdp.get_attr("IFLA_XDP_PROG_ID") if xdp else None)

            t = threading.Thread(target=watch)
            t.start()
            try:
                # a different program: the replay build reads its clock from a map
                new = KernelFilter(FilterConfig(**{**cfg.__dict__, "replay_clock": True}))
                res = new.load()
            finally:
                stop.set()
                t.join()
            new_id, mode = new._attached_prog()
            assert len(compiles) == 1 and res.compiled, "the changed program was compiled (in a child)"
            assert res.replaced and not res.adopted
            assert new_id != old_id and new_id == bpfsys.prog_info(new.prog_fd).id and mode == "native"
            assert None not in seen and len(seen) > 1, "the interface was without a program during the replace"
            assert set(seen) <= {old_id, new_id}
            assert _pinned_map_ids(cfg.pin_dir) == map_ids, "the replace did not keep the pinned maps"
            assert new.active_version() == 7
            assert len(program.program_pins(cfg.pin_dir)) == 1, "the replaced program is still pinned"
            assert "bcc" not in sys.modules
        finally:
            if new is not None:
                new.detach(remove_pins=True)
                new.close()
            else:
                old.detach(remove_pins=True)


def _pinned_map_ids(pin_dir: str) -> dict[str, int]:
    out = {}
    for name in sorted(os.listdir(pin_dir)):
        if name.startswith(program.PROG_PIN_PREFIX):
            continue
        fd = bpfsys.obj_get(os.path.join(pin_dir, name))
        try:
            out[name] = bpfsys.map_info(fd).id
        finally:
            os.close(fd)
    return out
