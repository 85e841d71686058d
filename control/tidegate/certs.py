"""`tidegate certs`: a small lab PKI for the agent's mTLS.

Writes into one directory:
  ca.pem, ca.key          a CA (reused when already there, so clients can be added later)
  server.pem, server.key  the agent's certificate: the server name, localhost and 127.0.0.1
  NAME.pem, NAME.key      one client certificate per name (CN=NAME, clientAuth)
  roles.json              {NAME: role}, merged with an existing file (the agent's --role-map)
Keys are EC P-256 and mode 0600. Uses the `cryptography` package when it is
importable, otherwise the openssl command. For labs: a production CA is run
elsewhere, with its key offline.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # always fullmatch: `$` accepts a final newline


class CertsError(Exception):
    pass


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def make_lab_pki(out: str | os.PathLike, server_name: str, clients: list[str], role: str = "admin",
                 days: int = 365, backend: str = "auto") -> dict:  # fmt: skip
    """Make (or extend) the lab PKI; returns {"dir", "files", "roles", "backend"}."""
    if role not in ("admin", "read"):
        raise CertsError(f"role must be admin or read, not {role!r}")
    for n in [server_name, *clients]:
        if not NAME_RE.fullmatch(n):
            raise CertsError(f"{n!r} is not a usable name (letters, digits, . _ - @; up to 64)")
    if "ca" in clients or "server" in clients:
        raise CertsError("client names `ca` and `server` would overwrite the CA or server files")
    if days < 1:
        raise CertsError("--days must be at least 1")
    d = Path(out).resolve()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CertsError(f"{d}: cannot create: {e.strerror}") from None
    if backend == "auto":
        try:
            import cryptography  # noqa: F401

            backend = "cryptography"
        except ImportError:
            backend = "openssl"
    if backend == "openssl" and not shutil.which("openssl"):
        raise CertsError("neither the Python `cryptography` package nor the openssl command is available")
    make = _Crypto(d, days) if backend == "cryptography" else _OpenSSL(d, days)
    files = []
    if not (d / "ca.pem").exists() or not (d / "ca.key").exists():
        make.ca()
    files += [str(d / "ca.pem"), str(d / "ca.key")]
    make.leaf("server", server_name, server=True)
    files += [str(d / "server.pem"), str(d / "server.key")]
    for c in clients:
        make.leaf(c, c, server=False)
        files += [str(d / f"{c}.pem"), str(d / f"{c}.key")]
    roles_path = d / "roles.json"
    roles = {}
    if roles_path.exists():
        try:
            roles = json.loads(roles_path.read_text())
        except (OSError, ValueError) as e:
            raise CertsError(f"{roles_path}: not a JSON role map: {e}") from None
    roles.update({c: role for c in clients})
    _write(roles_path, (json.dumps(roles, indent=2, sort_keys=True) + "\n").encode())
    files.append(str(roles_path))
    return {"dir": str(d), "files": files, "roles": roles, "backend": backend}


def _sans(name: str) -> list[str]:
    names = [name, "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(names))


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


class _Crypto:
    def __init__(self, d: Path, days: int):
        self.d, self.days = d, days

    def _key(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        return ec.generate_private_key(ec.SECP256R1())

    def _save(self, stem: str, key, cert) -> None:
        from cryptography.hazmat.primitives import serialization

        _write(self.d / f"{stem}.key", key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), private=True)  # fmt: skip
        _write(self.d / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject, issuer, public_key):
        import datetime

        from cryptography import x509

        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=self.days)))  # fmt: skip

    def ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        key = self._key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tidegate lab CA")])
        cert = (self._builder(name, name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))  # fmt: skip
        self._save("ca", key, cert)

    def leaf(self, stem: str, cn: str, server: bool) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key = serialization.load_pem_private_key((self.d / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((self.d / "ca.pem").read_bytes())
        key = self._key()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), ca_cert.subject,
                           key.public_key())
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                            critical=False))  # fmt: skip
        if server:
            sans = [x509.IPAddress(ipaddress.ip_address(s)) if _is_ip(s) else x509.DNSName(s) for s in _sans(cn)]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        self._save(stem, key, b.sign(ca_key, hashes.SHA256()))


class _OpenSSL:
    def __init__(self, d: Path, days: int):
        self.d, self.days = d, days

    def _run(self, *argv: str) -> None:
        r = subprocess.run(["openssl", *argv], capture_output=True, text=True)
        if r.returncode != 0:
            raise CertsError(f"openssl {argv[0]} failed: {r.stderr.strip().splitlines()[-1:]}")

    def _key(self, stem: str) -> Path:
        p = self.d / f"{stem}.key"
        self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(p))
        os.chmod(p, 0o600)
        return p

    def ca(self) -> None:
        key = self._key("ca")
        self._run("req", "-x509", "-new", "-key", str(key), "-subj", "/CN=tidegate lab CA", "-days",
                  str(self.days), "-sha256", "-out", str(self.d / "ca.pem"), "-addext",
                  "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
                  "keyUsage=critical,digitalSignature,keyCertSign,cRLSign")  # fmt: skip

    def leaf(self, stem: str, cn: str, server: bool) -> None:
        key = self._key(stem)
        ext = ["basicConstraints=critical,CA:FALSE"]
        if server:
            sans = ",".join(f"IP:{s}" if _is_ip(s) else f"DNS:{s}" for s in _sans(cn))
            ext += ["extendedKeyUsage=serverAuth", f"subjectAltName={sans}"]
        else:
            ext += ["extendedKeyUsage=clientAuth"]
        with tempfile.TemporaryDirectory() as tmp:
            csr, extfile = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
            extfile.write_text("\n".join(ext) + "\n")
            self._run("req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-out", str(csr))
            self._run("x509", "-req", "-in", str(csr), "-CA", str(self.d / "ca.pem"), "-CAkey",
                      str(self.d / "ca.key"), "-CAcreateserial", "-days", str(self.days), "-sha256",
                      "-extfile", str(extfile), "-out", str(self.d / f"{stem}.pem"))  # fmt: skip
        srl = self.d / "ca.srl"
        if srl.exists():
            srl.unlink()
