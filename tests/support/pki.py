"""A throw-away PKI made with the openssl command: a CA, a server and a client certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.peers import require_tool

NAMES = ("ca", "ca-key", "server", "server-key", "client", "client-key", "rogue", "rogue-key")


def _run(*args: str) -> None:
    subprocess.run([require_tool("openssl", "openssl"), *args], check=True, capture_output=True)


def _self_signed_ca(cert: Path, key: Path, name: str) -> None:
    _run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign",
    )  # fmt: skip


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> None:
    csr, ext = directory / f"{name}.csr", directory / f"{name}.cnf"
    _run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(directory / f"{name}-key.pem"), "-out", str(csr),
    )  # fmt: skip
    ext.write_text(extensions)
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-out", str(directory / f"{name}.pem"),
        "-extfile", str(ext),
    )  # fmt: skip


def make_pki(directory: Path) -> dict[str, Path]:
    """CA, a server certificate for 127.0.0.1, a client certificate signed by the same CA,
    and a 'rogue' client certificate signed by a CA nobody trusts."""
    directory.mkdir(parents=True)
    files = {name: directory / f"{name}.pem" for name in NAMES}
    _self_signed_ca(files["ca"], files["ca-key"], "test CA")
    _signed(
        directory,
        "server",
        files["ca"],
        files["ca-key"],
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    _signed(directory, "client", files["ca"], files["ca-key"], "extendedKeyUsage=clientAuth\n")
    rogue_ca, rogue_ca_key = directory / "rogue-ca.pem", directory / "rogue-ca-key.pem"
    _self_signed_ca(rogue_ca, rogue_ca_key, "rogue CA")
    _signed(directory, "rogue", rogue_ca, rogue_ca_key, "extendedKeyUsage=clientAuth\n")
    return files
