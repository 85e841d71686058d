"""`tidegate certs`: a small lab PKI for the agent's mTLS.

Writes into one directory:
  ca.pem, ca.key          a CA (reused when already there, so clients can be added later)
  server.pem, server.key  the agent's certificate: the server name, localhost and 127.0.0.1
                          (made once; later runs that add clients keep it byte for byte)
  NAME.pem, NAME.key      one client certificate per name (CN=NAME, clientAuth)
  roles.json              {NAME: role}, merged with an existing file (the agent's --role-map)
Keys are EC P-256 and mode 0600. Uses the `cryptography` package when it is
importable, otherwise the openssl command. For labs: a production CA is run
elsewhere, with its key offline.

The directory holds keys, so nobody else may be able to write it: one that
another user owns or can write (group or others), such as /tmp, is refused.
It is opened once and every file is read and written through that handle:
files are written to a fresh temporary name (O_EXCL | O_NOFOLLOW) and
renamed into place, and files it reads (the CA, the role map) are opened
with O_NOFOLLOW, so a link planted in the directory is never followed.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # always fullmatch: `$` accepts a final newline
DEFAULT_SERVER_NAME = "tidegate"


class CertsError(Exception):
    pass


class _OutDir:
    """The output directory, checked and opened once."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise CertsError(f"{path}: cannot create or open: {e.strerror}") from None
        st = os.fstat(self.fd)
        who = [w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
        problem = None
        if st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        elif who:
            problem = f"is writable by {' and '.join(who)} (mode {stat.S_IMODE(st.st_mode):04o})"
        if problem:
            self.close()
            raise CertsError(f"{path} {problem}: another user could replace the keys or plant links there; "
                             "use a directory only you can write (e.g. mkdir -m 700 DIR)")  # fmt: skip

    def close(self) -> None:
        os.close(self.fd)

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def read(self, name: str) -> bytes:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CertsError(f"{self.path / name} is a symbolic link: refusing to follow it") from None
            raise CertsError(f"{self.path / name}: cannot read: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def write(self, name: str, data: bytes, private: bool = False) -> None:
        """A fresh temporary file (never an existing file or a link), then an
        atomic rename over `name` (which replaces a link, never follows it)."""
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600 if private else 0o644, dir_fd=self.fd)
        except OSError as e:
            what = "already exists" if e.errno == errno.EEXIST else e.strerror
            raise CertsError(f"{self.path / tmp}: cannot create the temporary file: {what}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            raise


def make_lab_pki(out: str | os.PathLike, server_name: str | None, clients: list[str], role: str = "admin",
                 days: int = 365, backend: str = "auto") -> dict:  # fmt: skip
    """Make (or extend) the lab PKI; returns {"dir", "files", "written", "kept", "roles", "backend",
    "server_name"}.

    The CA and the server's certificate are made only when missing: adding a
    client never replaces them. server_name None means "keep the existing
    server certificate, or make one for `tidegate`"; a name that differs from
    the existing certificate's is refused."""
    if role not in ("admin", "read"):
        raise CertsError(f"role must be admin or read, not {role!r}")
    for n in [*([server_name] if server_name is not None else []), *clients]:
        if not NAME_RE.fullmatch(n):
            raise CertsError(f"{n!r} is not a usable name (letters, digits, . _ - @; up to 64)")
    if "ca" in clients or "server" in clients:
        raise CertsError("client names `ca` and `server` would overwrite the CA or server files")
    if days < 1:
        raise CertsError("--days must be at least 1")
    if backend == "auto":
        try:
            import cryptography  # noqa: F401

            backend = "cryptography"
        except ImportError:
            backend = "openssl"
    if backend == "openssl" and not shutil.which("openssl"):
        raise CertsError("neither the Python `cryptography` package nor the openssl command is available")
    d = _OutDir(Path(out).resolve())
    try:
        return _make(d, backend, server_name, clients, role, days)
    finally:
        d.close()


def _make(d: _OutDir, backend: str, server_name: str | None, clients: list[str], role: str, days: int) -> dict:
    make = _Crypto(days) if backend == "cryptography" else _OpenSSL(days)
    written: list[str] = []
    kept: list[str] = []
    new_ca = not (d.exists("ca.pem") and d.exists("ca.key"))
    if new_ca:
        ca_key, ca_cert = make.ca()
    else:
        ca_key, ca_cert = d.read("ca.key"), d.read("ca.pem")
    have_server = not new_ca and d.exists("server.pem") and d.exists("server.key")
    current = make.common_name(d.read("server.pem")) if have_server else (server_name or DEFAULT_SERVER_NAME)
    if have_server and server_name is not None:
        if current != server_name:
            raise CertsError(f"{d.path / 'server.pem'} is for {current!r}, not {server_name!r}: to make a new server "
                             "certificate, move server.pem and server.key aside first (the agent and its "
                             "clients then need the new one)")  # fmt: skip
    roles = {}
    if d.exists("roles.json"):
        try:
            roles = json.loads(d.read("roles.json"))
        except ValueError as e:
            raise CertsError(f"{d.path / 'roles.json'}: not a JSON role map: {e}") from None
        if not isinstance(roles, dict):
            raise CertsError(f"{d.path / 'roles.json'}: not a JSON role map (an object of name: role)")
    # everything is made in memory first: a failure above leaves the directory as it was
    files: dict[str, tuple[bytes, bool]] = {}
    if new_ca:
        files.update({"ca.key": (ca_key, True), "ca.pem": (ca_cert, False)})
    if not have_server:
        key, cert = make.leaf(current, True, ca_key, ca_cert)
        files.update({"server.key": (key, True), "server.pem": (cert, False)})
    for c in clients:
        key, cert = make.leaf(c, False, ca_key, ca_cert)
        files.update({f"{c}.key": (key, True), f"{c}.pem": (cert, False)})
    roles.update({c: role for c in clients})
    files["roles.json"] = ((json.dumps(roles, indent=2, sort_keys=True) + "\n").encode(), False)
    for name, (data, private) in files.items():
        d.write(name, data, private)
        written.append(str(d.path / name))
    kept = [str(d.path / n) for n in ("ca.pem", "ca.key", "server.pem", "server.key") if n not in files]
    order = ["ca.pem", "ca.key", "server.pem", "server.key"] + [f"{c}{x}" for c in clients for x in (".pem", ".key")]
    return {"dir": str(d.path), "files": [str(d.path / n) for n in order] + [str(d.path / "roles.json")],
            "written": written, "kept": kept, "roles": roles, "backend": backend, "server_name": current}  # fmt: skip


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
    """Keys and certificates as PEM bytes, with the `cryptography` package."""

    def __init__(self, days: int):
        self.days = days

    def _key(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        return ec.generate_private_key(ec.SECP256R1())

    @staticmethod
    def _pem(key, cert) -> tuple[bytes, bytes]:
        from cryptography.hazmat.primitives import serialization

        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
        return private, cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject, issuer, public_key):
        import datetime

        from cryptography import x509

        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=self.days)))  # fmt: skip

    def ca(self) -> tuple[bytes, bytes]:
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
        return self._pem(key, cert)

    def leaf(self, cn: str, server: bool, ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[bytes, bytes]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        try:
            ca_key = serialization.load_pem_private_key(ca_key_pem, None)
            ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        except ValueError as e:
            raise CertsError(f"ca.key and ca.pem are not a usable CA: {e}") from None
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
        return self._pem(key, b.sign(ca_key, hashes.SHA256()))

    def common_name(self, cert_pem: bytes) -> str:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError as e:
            raise CertsError(f"server.pem is not a certificate: {e}") from None
        return str(names[0].value) if names else ""


class _OpenSSL:
    """The same with the openssl command, working in a private temporary
    directory; only the resulting bytes reach the output directory."""

    def __init__(self, days: int):
        self.days = days

    def _run(self, *argv: str) -> str:
        r = subprocess.run(["openssl", *argv], capture_output=True, text=True)
        if r.returncode != 0:
            raise CertsError(f"openssl {argv[0]} failed: {r.stderr.strip().splitlines()[-1:]}")
        return r.stdout

    def ca(self) -> tuple[bytes, bytes]:
        with tempfile.TemporaryDirectory(prefix="tidegate-certs-") as tmp:
            key, cert = Path(tmp) / "ca.key", Path(tmp) / "ca.pem"
            self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
            self._run("req", "-x509", "-new", "-key", str(key), "-subj", "/CN=tidegate lab CA", "-days",
                      str(self.days), "-sha256", "-out", str(cert), "-addext",
                      "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
                      "keyUsage=critical,digitalSignature,keyCertSign,cRLSign")  # fmt: skip
            return key.read_bytes(), cert.read_bytes()

    def leaf(self, cn: str, server: bool, ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[bytes, bytes]:
        ext = ["basicConstraints=critical,CA:FALSE"]
        if server:
            sans = ",".join(f"IP:{s}" if _is_ip(s) else f"DNS:{s}" for s in _sans(cn))
            ext += ["extendedKeyUsage=serverAuth", f"subjectAltName={sans}"]
        else:
            ext += ["extendedKeyUsage=clientAuth"]
        with tempfile.TemporaryDirectory(prefix="tidegate-certs-") as tmp:
            t = Path(tmp)  # mode 0700: nobody else can reach these files
            (t / "ca.key").write_bytes(ca_key_pem)
            (t / "ca.pem").write_bytes(ca_cert_pem)
            (t / "ext.cnf").write_text("\n".join(ext) + "\n")
            self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(t / "leaf.key"))
            self._run("req", "-new", "-key", str(t / "leaf.key"), "-subj", f"/CN={cn}", "-out", str(t / "req.csr"))
            self._run("x509", "-req", "-in", str(t / "req.csr"), "-CA", str(t / "ca.pem"), "-CAkey",
                      str(t / "ca.key"), "-CAcreateserial", "-days", str(self.days), "-sha256",
                      "-extfile", str(t / "ext.cnf"), "-out", str(t / "leaf.pem"))  # fmt: skip
            return (t / "leaf.key").read_bytes(), (t / "leaf.pem").read_bytes()

    def common_name(self, cert_pem: bytes) -> str:
        with tempfile.TemporaryDirectory(prefix="tidegate-certs-") as tmp:
            (Path(tmp) / "c.pem").write_bytes(cert_pem)
            out = self._run("x509", "-in", str(Path(tmp) / "c.pem"), "-noout", "-subject", "-nameopt", "RFC2253")
        m = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)*)", out.strip().removeprefix("subject="))
        return m.group(1) if m else ""
