"""`tidegate certs`: the lab PKI. Names match their pattern in full, adding a
client leaves the CA and the server's files alone, and the files are written
so that nobody else on the host can plant or swap them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tidegate.certs import CertsError, make_lab_pki

BACKENDS = ["cryptography", pytest.param("openssl", marks=pytest.mark.skipif(
    not shutil.which("openssl"), reason="the openssl command is not installed"))]  # fmt: skip
BIN = Path(sys.executable).parent / "tidegate"


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("server, client", [("edge1\n", "alice"), ("edge1", "alice\n"), ("edge1", "\nalice"),
                                            ("edge1", "al\nice"), ("edge1\r\n", "alice")])  # fmt: skip
def test_names_must_match_in_full(tmp_path, server, client):
    out = tmp_path / "pki"
    with pytest.raises(CertsError, match="is not a usable name"):
        make_lab_pki(out, server, [client])
    assert not out.exists() or not any(out.iterdir()), "nothing was written"
