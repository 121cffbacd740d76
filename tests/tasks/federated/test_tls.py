"""TLS between SuperLink, SuperNode and the flwr CLI: certificates made on the fly (a throw-away CA and a server
certificate for 127.0.0.1), a real ``flower-superlink`` with ``--ssl-*`` and SuperNodes with
``--root-certificates``; stopped by PID."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tasks.federated.runner import CONNECTION, _write_connection
from tasks.federated.services import (
    SuperLink,
    SuperLinkUnreachableError,
    SuperNode,
    TlsFiles,
    _bin,
    flower_env,
    wait_for_health,
)


def _ca(name: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_certificates(folder: Path) -> tuple[TlsFiles, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and a second, unrelated CA (PEM files)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca = _ca("fedscan test CA", now)
    _, other = _ca("some other CA", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "other-ca.pem").write_bytes(other.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key"), folder / "other-ca.pem"


def _online_nodes(env: dict[str, str]) -> list[dict[str, str]]:
    out = subprocess.run(
        [_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    text = out.stdout[out.stdout.find("{") :] if "{" in out.stdout else "{}"
    return [n for n in json.loads(text).get("nodes", []) if n.get("status") == "online"]


@pytest.mark.slow
@pytest.mark.integration
def test_tls_superlink_accepts_a_supernode_with_its_root_certificate_only(tmp_path):
    tls, other_ca = make_certificates(tmp_path / "certs")
    link = SuperLink(flwr_home=tmp_path / "link", tls=tls).start()  # healthy over https, verified with the CA
    started = [link]
    try:
        with pytest.raises(SuperLinkUnreachableError):  # plain http to a TLS SuperLink gets nowhere
            wait_for_health(link.address, timeout_s=2, tls=False)
        good = SuperNode(
            superlink=link.address,
            flwr_home=tmp_path / "good",
            node_config={"site-store": str(tmp_path / "A.zarr")},
            root_certificates=tls.ca_certfile,
        ).start()
        bad = SuperNode(
            superlink=link.address,
            flwr_home=tmp_path / "bad",
            node_config={"site-store": str(tmp_path / "B.zarr")},
            root_certificates=other_ca,
        ).start()
        started += [good, bad]
        home = tmp_path / "cli"
        _write_connection(home, link.address, root_certificates=tls.ca_certfile)
        env = flower_env(home)
        deadline = time.monotonic() + 90
        online: list[dict[str, str]] = []
        while time.monotonic() < deadline and not online:
            online = _online_nodes(env)
            time.sleep(1)
        assert len(online) == 1, "the SuperNode that trusts the SuperLink's CA never came online"
        time.sleep(3)  # the node with the wrong CA had as long as the good one, and more
        assert len(_online_nodes(env)) == 1
        assert bad.proc is not None
    finally:
        for s in reversed(started):
            s.stop()
