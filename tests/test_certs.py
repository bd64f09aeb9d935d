"""``fedvision certs``: CA, server certificate, node keys, refusals and a real TLS handshake."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedvision.cli import main
from fedvision.errors import FedvisionError
from fedvision.runtime.certs import CertFiles, make_certs

HOSTS = ["localhost", "127.0.0.1", "::1", "superlink.example.org"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"), HOSTS, node_keys=2, days=30)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> CertFiles:
    """An independent CA and server certificate for the same hosts."""
    return make_certs(tmp_path_factory.mktemp("other"), HOSTS)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(ca: Path, server: Path, name: x509.GeneralName) -> None:
    verifier = PolicyBuilder().store(Store([_cert(ca)])).build_server_verifier(name)
    verifier.verify(_cert(server), [])


def test_server_certificate_verifies_for_every_host_against_its_ca(certs):
    _verify(certs.ca_cert, certs.server_cert, x509.DNSName("localhost"))
    _verify(certs.ca_cert, certs.server_cert, x509.DNSName("superlink.example.org"))
    _verify(certs.ca_cert, certs.server_cert, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _verify(certs.ca_cert, certs.server_cert, x509.IPAddress(ipaddress.ip_address("::1")))


def test_a_name_or_address_not_in_the_sans_fails(certs):
    with pytest.raises(VerificationError):
        _verify(certs.ca_cert, certs.server_cert, x509.DNSName("evil.example.org"))
    with pytest.raises(VerificationError):
        _verify(certs.ca_cert, certs.server_cert, x509.IPAddress(ipaddress.ip_address("10.0.0.1")))


def test_another_cas_certificate_does_not_verify(certs, other):
    with pytest.raises(VerificationError):
        _verify(certs.ca_cert, other.server_cert, x509.DNSName("localhost"))
    _verify(other.ca_cert, other.server_cert, x509.DNSName("localhost"))  # but its own CA does


def test_sans_are_exactly_the_hosts_with_ips_as_ip_addresses(certs):
    san = _cert(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = _cert(certs.server_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_ca_is_a_critical_ca_that_signs_certificates(certs):
    ca = _cert(certs.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert bc.critical and bc.value.ca
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 30


@pytest.mark.parametrize(("key", "cert"), [("ca_key", "ca_cert"), ("server_key", "server_cert")])
def test_private_key_matches_certificate_and_is_0600(certs, key, cert):
    priv = serialization.load_pem_private_key(getattr(certs, key).read_bytes(), password=None)
    assert priv.public_key() == _cert(getattr(certs, cert)).public_key()
    assert stat.S_IMODE(getattr(certs, key).stat().st_mode) == 0o600


def _flower_loaders():
    """Flower's loaders (``flower-supernode``, ``flwr supernode register``), else cryptography's."""
    try:
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
    except ImportError:  # pragma: no cover - a Flower that moved them
        return (
            lambda p: serialization.load_ssh_private_key(p.read_bytes(), None),
            lambda p: serialization.load_ssh_public_key(p.read_bytes()),
        )

    def private(path: Path) -> ec.EllipticCurvePrivateKey:
        args = argparse.Namespace(
            auth_supernode_private_key=str(path), auth_supernode_public_key=None
        )
        return _try_setup_client_authentication(args)[0]

    def public(path: Path) -> ec.EllipticCurvePublicKey:
        return serialization.load_pem_public_key(try_load_public_key(path))

    return private, public


def test_node_keys_load_with_flowers_loaders_and_pair_up(certs):
    load_private, load_public = _flower_loaders()
    assert [p.name for p in certs.node_keys] == ["node-0", "node-1"]
    publics = []
    for i, (priv_path, pub_path) in enumerate(
        zip(certs.node_keys, certs.node_public_keys, strict=True)
    ):
        priv, pub = load_private(priv_path), load_public(pub_path)
        assert isinstance(priv.curve, ec.SECP384R1)
        assert priv.public_key() == pub
        assert stat.S_IMODE(priv_path.stat().st_mode) == 0o600
        assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 AAAA")
        assert pub_path.read_text().rstrip().endswith(f"fedvision-node-{i}")
        publics.append(pub)
    assert publics[0] != publics[1]


def test_existing_files_are_refused_unless_overwrite(tmp_path):
    first = make_certs(tmp_path, ["localhost"]).ca_cert.read_bytes()
    with pytest.raises(FedvisionError, match="use --overwrite to replace them"):
        make_certs(tmp_path, ["localhost"])
    assert (tmp_path / "ca.pem").read_bytes() == first  # the refusal wrote nothing
    second = make_certs(tmp_path, ["localhost"], overwrite=True)
    assert second.ca_cert.read_bytes() != first
    assert stat.S_IMODE(second.server_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("hosts", "kwargs", "message"),
    [
        (["localhost:9092"], {}, "neither an IP address nor a DNS name"),
        (["super link"], {}, "neither an IP address nor a DNS name"),
        (["[::1]"], {}, "neither an IP address nor a DNS name"),
        (["-bad.example"], {}, "neither an IP address nor a DNS name"),
        ([], {}, "no host given"),
        (["localhost"], {"days": 0}, "--days must be"),
        (["localhost"], {"node_keys": -1}, "--node-keys must be"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path, hosts, kwargs, message):
    with pytest.raises(FedvisionError, match=message):
        make_certs(tmp_path / "out", hosts, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_writes_files_and_says_where_they_go(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["certs", "--out", str(out), "--node-keys", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "ca.pem") in printed and str(out / "node-keys" / "node-0.pub") in printed
    assert "--auth-supernode-private-key" in printed and "flwr supernode register" in printed
    san = _cert(out / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_cli_bad_host_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "c"), "--host", "localhost:9092"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedvision: error: host 'localhost:9092'")


def _handshake(files: CertFiles, cafile: Path, server_hostname: str) -> bytes:
    """One TLS connection to a loopback server that serves ``files``' certificate."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))  # trusts only this CA
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            return tls.recv(2)
    finally:
        thread.join(5)
        listener.close()


def test_tls_handshake_succeeds_with_the_ca_and_fails_with_another(certs, other):
    assert _handshake(certs, certs.ca_cert, "localhost") == b"ok"
    assert _handshake(certs, certs.ca_cert, "127.0.0.1") == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, other.ca_cert, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, certs.ca_cert, "evil.example.org")
