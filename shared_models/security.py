"""Keys and certificates of a real federation (made with the ``cryptography`` package).

Two things secure a fedaffect federation, both enforced by Flower's SuperLink:

* **TLS**: the coordinator's SuperLink serves HTTPS with a server certificate signed by the
  federation's own certificate authority (CA). Devices trust that CA only
  (``flower-supernode --root-certificates ca.crt``), so a SuperLink with a certificate
  from any other CA, a self-signed one or an expired one is refused.
* **SuperNode authentication**: every device holds an EC P-384 key pair (OpenSSH format,
  as Flower expects); the operator registers the public key with the SuperLink
  (``flwr supernode register``), and the SuperLink refuses any device whose key is not
  registered or was unregistered.

This module makes and checks those keys and certificates; :mod:`server.deployment` and
:mod:`client.deployment` use it. No shell-out to ``openssl`` is needed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateError", "make_ca", "make_server_certificate", "write_private", "write_private_key", "write_certificate",
    "make_device_keypair", "read_device_public_key", "fingerprint", "check_certificate", "check_device_name",
]


class CertificateError(ValueError):
    """A key or certificate is missing, unreadable, expired, not yet valid or not signed
    by the expected CA; the message says which and what to do."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedaffect"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "fedaffect CA", days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed certificate authority (EC P-384, SHA-384).

    Parameters
    ----------
    common_name : str
    days : int
        Validity in days from now.

    Returns
    -------
    (certificate, private key)
    """
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
                            days: int = 825, *, not_before: dt.datetime | None = None,
                            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for the SuperLink, signed by the federation's CA.

    Parameters
    ----------
    ca_cert, ca_key
        The CA (:func:`make_ca`).
    hosts : list of str
        Names and IP addresses devices use to reach the coordinator; each becomes a
        subject alternative name (the first is also the common name).
    days : int
        Validity in days (825: the longest browsers accept; renew with ``server init
        --renew``).
    not_before : datetime, optional
        Start of validity (default: five minutes ago); tests use it to make expired
        certificates.

    Raises
    ------
    ValueError
        If ``hosts`` is empty.
    """
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    start = not_before or (_now() - dt.timedelta(minutes=5))
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only its owner can read or write (mode 0600, never wider,
    even for a moment): keys, and configs that hold a password."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, openssh: bool = False) -> Path:
    """Write a private key readable by its owner only (mode 0600): PEM PKCS#8, or OpenSSH
    format for a SuperNode's authentication key."""
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    write_private(Path(path), key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    return Path(path)


def write_certificate(path: Path, cert: x509.Certificate) -> Path:
    """Write a certificate in PEM."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def check_device_name(name: str) -> str:
    """A device name as the registry and the SuperNode's node config take it.

    Raises
    ------
    ValueError
        Unless it is 1-100 letters, digits, ``-``, ``_`` or ``.``, starting with a letter
        or digit.
    """
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name or ""):
        raise ValueError(f"device name {name!r}: use letters, digits, '-', '_' or '.' (at most 100)")
    return name


def make_device_keypair(private_path: Path, public_path: Path) -> str:
    """Make a device's SuperNode authentication key pair: EC P-384 in OpenSSH format.

    Parameters
    ----------
    private_path : Path
        Written with mode 0600 (``flower-supernode --auth-supernode-private-key``).
    public_path : Path
        One line, ``ecdsa-sha2-nistp384 AAAA... NAME``: what the device's person sends to
        the operator for ``fedaffect server enrol``.

    Returns
    -------
    str
        The public key line.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_key(private_path, key, openssh=True)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    Path(public_path).write_text(line + "\n")
    return line


def read_device_public_key(path: Path) -> str:
    """Read and check a device's public key file.

    Returns
    -------
    str
        The key line without comment (``ecdsa-sha2-nistp384 AAAA...``).

    Raises
    ------
    CertificateError
        If the file is missing, is not an OpenSSH public key, or is not EC P-384 (the
        only kind Flower's SuperNode authentication accepts).
    """
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"public key {path} not found (the device makes it with `fedaffect device init`)")
    text = path.read_text(errors="replace").strip()
    if "PRIVATE KEY" in text:
        raise CertificateError(f"{path} holds a PRIVATE key: send only the .pub file, and keep the private key "
                               "on the device")
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{path} is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        kind = type(key).__name__.replace("_", "")
        raise CertificateError(f"{path} is a {kind} key; Flower SuperNode authentication needs EC P-384 "
                               "(ecdsa-sha2-nistp384): make one with `fedaffect device init`")
    return " ".join(text.split()[:2])


def fingerprint(public_key_line: str) -> str:
    """SHA-256 fingerprint of an OpenSSH public key line, as ``ssh-keygen -l`` prints it
    (``SHA256:`` + unpadded base64)."""
    import base64

    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_certificate(path: Path, *, ca_path: Path | None = None, host: str | None = None,
                      must_be_ca: bool = False, warn_days: int = 30) -> list[str]:
    """Check a PEM certificate before a SuperLink or SuperNode relies on it.

    Parameters
    ----------
    path : Path
        The certificate.
    ca_path : Path, optional
        CA certificate that must have signed it.
    host : str, optional
        Name or IP address the certificate must be valid for (subject alternative names).
    must_be_ca : bool
        Require a CA certificate (``--root-certificates``/``--ca``).
    warn_days : int
        Expiry closer than this many days gives a warning.

    Returns
    -------
    list of str
        Warnings (e.g. expires in 10 days); empty when all is well.

    Raises
    ------
    CertificateError
        Missing or unreadable file, not yet valid, expired, not a CA when one is needed,
        self-signed where a CA-signed certificate is needed, not signed by ``ca_path``,
        or not valid for ``host``.
    """
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"certificate {path} not found")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertificateError(f"{path} is not a PEM certificate ({err})") from None
    now = _now()
    if cert.not_valid_before_utc > now:
        raise CertificateError(f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                               "UTC: check this machine's clock")
    if cert.not_valid_after_utc <= now:
        raise CertificateError(f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                               "renew it (`fedaffect server init --renew`)")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if must_be_ca and not is_ca:
        raise CertificateError(f"{path} is not a CA certificate: pass the federation's ca.crt "
                               "(the coordinator's <state-dir>/certs/ca.crt)")
    if ca_path is not None:
        ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
        if cert.issuer == cert.subject and cert.fingerprint(hashes.SHA256()) != ca.fingerprint(hashes.SHA256()):
            raise CertificateError(f"certificate {path} is self-signed, not signed by the CA {ca_path}")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateError(f"certificate {path} is not signed by the CA {ca_path}") from None
    if host is not None:
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        names = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
        names |= {str(n) for n in sans.get_values_for_type(x509.IPAddress)}
        if host not in names:
            raise CertificateError(f"certificate {path} is not valid for {host!r} (valid for: "
                                   f"{', '.join(sorted(names)) or 'nothing'}): re-run `fedaffect server init "
                                   f"--renew --host {host}`")
    left = cert.not_valid_after_utc - now
    return [f"certificate {path} expires in {left.days} days"] if left.days < warn_days else []
