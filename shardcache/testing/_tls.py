"""A self-signed certificate for memcached's TLS (``ProcessNode(tls=...)``) in tests."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from shardcache.testing._nodes import LOCALHOST, ServerSetupError


def make_self_signed_cert(
    directory: str | os.PathLike[str], common_name: str = LOCALHOST
) -> tuple[Path, Path]:
    """Write a self-signed certificate and its key (PEM) into ``directory``; return their paths.

    The certificate is valid for two days for ``common_name`` plus 127.0.0.1 and localhost. Uses
    the ``cryptography`` package if installed, else the ``openssl`` CLI. Thread-safe per directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "memcached-cert.pem", out / "memcached-key.pem"
    try:
        importlib.import_module("cryptography.x509")
    except ImportError:
        _make_cert_openssl(cert_path, key_path, common_name)
    else:
        _make_cert_cryptography(cert_path, key_path, common_name)
    return cert_path, key_path


def _make_cert_cryptography(cert_path: Path, key_path: Path, common_name: str) -> None:
    from cryptography import x509  # noqa: PLC0415 - optional dependency
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address(LOCALHOST)),
    ]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(common_name) != ipaddress.ip_address(LOCALHOST):
            sans.append(x509.IPAddress(ipaddress.ip_address(common_name)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_cert_openssl(cert_path: Path, key_path: Path, common_name: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerSetupError("need the 'cryptography' package or the openssl CLI to make a TLS certificate")
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={common_name}",
            "-addext", f"subjectAltName=IP:{LOCALHOST},DNS:localhost",
            "-keyout", str(key_path), "-out", str(cert_path),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(key_path, 0o600)
