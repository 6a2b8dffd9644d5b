"""``flotilla fed keys``: a CA, a server TLS certificate and per-site node keys for a trial federation.

Layout written under ``out_dir``::

    ca.crt  ca.key                  # the trial certificate authority (keep ca.key private)
    server.crt  server.key          # SuperLink TLS, SANs: localhost, 127.0.0.1 and --host values
    sites/<site>.key  <site>.pub    # SuperNode authentication keys (EC P-384, OpenSSH format)

The coordinator enrolls every ``sites/*.pub``; each site gets ``ca.crt`` and its own ``.key`` only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher.atomic import write_owner_only
from launcher.errors import FlotillaError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CURVE = ec.SECP384R1()


@dataclass(frozen=True)
class TrialKeys:
    """Paths of the files :func:`create_trial_keys` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # site -> (private key, public key)


def create_trial_keys(
    out_dir: Path, sites: list[str], hosts: list[str] | None = None, days: int = 30, force: bool = False
) -> TrialKeys:
    """Write a CA, a server certificate for ``hosts`` and one node key pair per site."""
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise FlotillaError(f"fed keys: site names must match {SITE_NAME.pattern}, got {bad}")
    if len(set(sites)) != len(sites) or not sites:
        raise FlotillaError(f"fed keys: give one or more distinct site names, got {sites}")
    if (out_dir / "ca.key").exists() and not force:
        raise FlotillaError(f"fed keys: {out_dir} already holds a CA (ca.key); pass --force to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sites").mkdir(exist_ok=True)

    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Flotilla trial CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flotilla-superlink")]),
            ca_name,
            server_key.public_key(),
            days,
        )
        .add_extension(
            x509.SubjectAlternativeName(_alt_names(["localhost", "127.0.0.1", *(hosts or [])])), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = TrialKeys(out_dir / "ca.crt", out_dir / "server.crt", out_dir / "server.key", {})
    _write(out_dir / "ca.key", _pem_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _pem_key(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for site in sites:
        paths.site_keys[site] = write_node_key(out_dir / "sites" / site)
    return paths


def write_node_key(stem: Path) -> tuple[Path, Path]:
    """An EC P-384 SuperNode key pair in OpenSSH format: ``<stem>.key`` and ``<stem>.pub``."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    key_path, pub_path = stem.with_suffix(".key"), stem.with_suffix(".pub")
    _write(key_path, private, private=True)
    _write(pub_path, public + f" {stem.name}\n".encode())
    return key_path, pub_path


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data``; a private key is owner-only (0600) before its first byte is written."""
    if private:
        write_owner_only(path, data)
    else:
        path.write_bytes(data)
