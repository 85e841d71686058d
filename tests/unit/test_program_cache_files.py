"""The program cache on disk: whole files, a bounded number, and a damaged
or foreign file refused with words (no kernel needed)."""

from __future__ import annotations

import json
import os

import pytest

from tidegate.kernel import program_cache

ENTRY = {"format": 1, "prog_type": 6, "name": "tidegate_xdp", "license": "GPL", "kern_version": 0, "tag": "00" * 8,
         "insns": "GBEAAAQAAAAAAAAAAAAAAJUAAAAAAAAA", "relocs": [[0, "tg_ctl"]],
         "maps": {"tg_ctl": {"name": "tg_ctl", "type": 2, "key_size": 4, "value_size": 8, "max_entries": 1,
                             "flags": 0, "pin": "/sys/fs/bpf/tidegate/x/tg_ctl"}}}  # fmt: skip


def test_entries_are_whole_private_and_bounded(tmp_path):
    cache = tmp_path / "program-cache"
    for i in range(5):
        path = program_cache.save(str(cache), f"d{i}", ENTRY)
        os.utime(path, (1000 + i, 1000 + i))
    assert sorted(os.listdir(cache)) == ["d2.json", "d3.json", "d4.json"], "the newest KEEP entries, no tmp files"
    assert os.stat(cache).st_mode & 0o777 == 0o700
    program_cache.save(str(cache), "d0", ENTRY)  # the current digest is always kept
    assert sorted(os.listdir(cache)) == ["d0.json", "d3.json", "d4.json"]
    e = program_cache.read(str(cache), "d0")
    assert e.relocs == [(0, "tg_ctl")] and e.maps["tg_ctl"].pin == "/sys/fs/bpf/tidegate/x/tg_ctl"
    assert program_cache.read(str(cache), "nothing") is None


@pytest.mark.parametrize("change, words", [
    (lambda e: {**e, "digest": "other"}, "of digest 'other'"),
    (lambda e: {**e, "relocs": [[1, "tg_ctl"]]}, "instruction 1 is not a load of map 'tg_ctl'"),
    (lambda e: {**e, "relocs": [[0, "tg_other"]]}, "is not a load of map 'tg_other'"),
    (lambda e: {k: v for k, v in e.items() if k != "maps"}, "malformed: KeyError"),
])  # fmt: skip
def test_an_entry_that_does_not_hold_together_is_refused(tmp_path, change, words):
    path = program_cache.save(str(tmp_path), "d", ENTRY)
    body = {k: v for k, v in change(json.loads(open(path).read())).items() if k != "checksum"}
    with open(path, "w") as f:
        json.dump({**body, "checksum": program_cache._checksum(body)}, f)  # well-formed, checksummed
    with pytest.raises(program_cache.CacheError, match=words):
        program_cache.read(str(tmp_path), "d")


def test_the_digest_names_the_compiler_too(monkeypatch):
    """A BCC upgrade compiles again: neither the pinned program nor a cached one of the older BCC is reused."""
    from tidegate.kernel import program

    assert "__version__" in program.compiler_version(), "BCC's version is read (as text) where BCC is installed"
    before = program.program_digest("int x;", ["-DA=1"])
    assert program.program_digest("int x;", ["-DA=1"]) == before, "the same program has the same name"
    monkeypatch.setattr(program, "compiler_version", lambda: "__version__ = '0.99.0'\n")
    assert program.program_digest("int x;", ["-DA=1"]) != before
