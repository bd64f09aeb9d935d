"""TLS and SuperNode-authentication material for a Flower deployment (``fedvision certs``).

A private CA signs the SuperLink's server certificate; SuperNodes and ``flwr`` trust only that CA.
Node keys are EC keys on a NIST curve in OpenSSH format, the only form Flower 1.39 accepts for
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvision.errors import FedvisionError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_KEY_DIR = "node-keys"
MAX_DAYS = 36500  # later end dates overflow datetime (year 9999) for no practical gain

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class CertFiles:
    """The files ``make_certs`` wrote (node keys in node order, public keys beside them)."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...] = ()
    node_public_keys: tuple[Path, ...] = ()

    def paths(self) -> list[Path]:
        """Every file written, CA first."""
        nodes = [
            p for pair in zip(self.node_keys, self.node_public_keys, strict=True) for p in pair
        ]
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key, *nodes]


def _san(host: str) -> x509.GeneralName:
    """An IPAddress SAN for an IPv4/IPv6 address, a DNSName SAN for a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if labels[0] == "*" and len(labels) > 2:  # a wildcard covers one leftmost label only
        labels = labels[1:]
    if len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels):
        return x509.DNSName(host)
    raise FedvisionError(
        f"host {host!r} is neither an IP address nor a DNS name: give a bare name or address "
        "without port, brackets or spaces, e.g. --host superlink.example.org --host 10.0.0.5"
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write through a temporary file created with its final mode, so a key is never readable."""
    mode = 0o600 if private else 0o644
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # os.open's mode is masked by the umask; a stale .tmp keeps its own
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(
    out: Path,
    hosts: Sequence[str],
    *,
    node_keys: int = 0,
    days: int = 365,
    overwrite: bool = False,
) -> CertFiles:
    """Write a private CA, a server certificate for ``hosts`` and ``node_keys`` node key pairs.

    Parameters
    ----------
    out : folder to write into (created if missing).
    hosts : names and IP addresses clients use to reach the SuperLink; each becomes a SAN.
    node_keys : number of SuperNode authentication key pairs (``node-keys/node-i`` and ``.pub``).
    days : validity of the CA and the server certificate.
    overwrite : replace existing files instead of refusing.

    Returns
    -------
    CertFiles naming every file written.
    """
    if not hosts:
        raise FedvisionError("no host given: name the SuperLink's DNS names/IPs with --host")
    if not 1 <= days <= MAX_DAYS:
        raise FedvisionError(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    if node_keys < 0:
        raise FedvisionError(f"--node-keys must be 0 or more, got {node_keys}")
    sans = list(dict.fromkeys(_san(h) for h in hosts))  # validate all before writing anything
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FedvisionError(f"{out} is a file, not a folder: choose another --out")
    node_dir = out / NODE_KEY_DIR
    files = CertFiles(
        out,
        out / CA_CERT,
        out / CA_KEY,
        out / SERVER_CERT,
        out / SERVER_KEY,
        tuple(node_dir / f"node-{i}" for i in range(node_keys)),
        tuple(node_dir / f"node-{i}.pub" for i in range(node_keys)),
    )
    existing = [p.name for p in files.paths() if p.exists()]
    if existing and not overwrite:
        raise FedvisionError(
            f"{out} already holds {', '.join(existing[:3])}: use --overwrite to replace them "
            "(clients that trust the old ca.pem will then refuse the new server)"
        )
    (node_dir if node_keys else out).mkdir(parents=True, exist_ok=True)

    # Backdated a little so that a client whose clock runs slightly behind still accepts them.
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=days)
    ca_key, server_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedvision CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedvision SuperLink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    for i, (priv_path, pub_path) in enumerate(
        zip(files.node_keys, files.node_public_keys, strict=True)
    ):
        key = _key()
        ssh = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        _write(priv_path, ssh, private=True)
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(pub_path, pub + f" fedvision-node-{i}\n".encode(), private=False)
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.server_key, _pem_key(server_key), private=True)
    # The certificates go last: their presence is what a second run refuses to overwrite.
    _write(files.server_cert, server.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """keyCertSign + cRLSign for the CA; digitalSignature (ECDHE-ECDSA handshakes) for a server."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def format_certs(files: CertFiles) -> str:
    """The files written, one a line, and where each goes."""
    lines = [str(p) for p in files.paths()]
    hint = (
        f"where: {CA_CERT} -> every client machine (flower-supernode --root-certificates) and "
        f"whoever submits runs (flwr root-certificates), and the server (--ssl-ca-certfile); "
        f"{SERVER_CERT}, {SERVER_KEY} stay on the server (flower-superlink --ssl-certfile, "
        f"--ssl-keyfile); {CA_KEY} stays offline"
    )
    if files.node_keys:
        hint += (
            f"; {NODE_KEY_DIR}/node-i -> client machine i (--auth-supernode-private-key); "
            f"{NODE_KEY_DIR}/node-i.pub -> registered on the server (flwr supernode register)"
        )
    return "\n".join([*lines, hint])
