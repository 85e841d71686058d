"""What the agent needs from the kernel to run without root.

Measured on Linux 6.18 by starting the agent as an unprivileged user with
one capability fewer at a time, a first start and a restart that adopts the
running program, again after the compile moved into a child process
(tests/e2e/test_service_user.py filters real traffic with exactly these):

- CAP_BPF: create maps, load the XDP program, pin objects in bpffs.
- CAP_PERFMON: the parser's pointer arithmetic (`R9 pointer -= pointer
  prohibited` from the verifier without it).
- CAP_NET_ADMIN: attach XDP to the interface (`Attaching prog: Operation
  not permitted` without it).
- CAP_SYS_ADMIN: the agent takes the program and maps the compile child
  loaded (and, after a restart, the pinned ones) by id:
  BPF_PROG_GET_FD_BY_ID / BPF_MAP_GET_FD_BY_ID (bpfsys.py), which the
  kernel allows only with CAP_SYS_ADMIN (`bpf cmd 14: Operation not
  permitted` at start without it). The kernel's bpf_capable() and
  perfmon_capable() also accept CAP_SYS_ADMIN, so on this kernel the first
  two are implied; they stay in the set so it says what each step needs.

Nothing else: no CAP_SYS_RESOURCE (map memory is charged to the memory
cgroup since Linux 5.11; the unit sets LimitMEMLOCK=infinity for older
kernels), no CAP_DAC_OVERRIDE (the state dir and the pin directory belong to
the service user).
"""

from __future__ import annotations

import os

# capability numbers from linux/capability.h
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
AGENT_NEEDS = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN")


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(needed=AGENT_NEEDS, effective: int | None = None) -> list[str]:
    """The capabilities in `needed` this process does not have (none for root)."""
    if effective is None:
        effective = effective_capabilities()
    return [name for name in needed if not effective & (1 << CAPABILITIES[name])]


def check_agent_privileges() -> None:
    missing = missing_capabilities()
    if missing:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        raise SystemExit(f"tidegate agent: runs as {who} without {', '.join(missing)}: it needs "
                         f"{', '.join(AGENT_NEEDS)} (root, or the systemd unit's AmbientCapabilities)")
