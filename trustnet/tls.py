"""TLS for the registry: its HTTP API (https://) and its websocket port (wss://).

The registry is given a certificate and its key (record, section 10: a
mounted file, e.g. /certs/cert.pem); replicas and nodes check it against a
CA file they are given, or the system's trust store. `make_certificates`
issues a private CA and a certificate for a list of hosts (IP addresses or
names; the CA's key is not kept), for a deployment without a CA of its own
and for the tests:
``trustnet tls-cert --host fd10:1234::1 --out certs/``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Certificates", "EncryptedKey", "MAX_DAYS", "client_context", "make_certificates",
           "server_context", "subject_name", "write_certificates"]


class EncryptedKey(ValueError):
    """The private key needs a pass phrase; a service that starts unattended cannot give one."""


def _no_pass_phrase() -> str:
    raise EncryptedKey("the private key is encrypted; give an unencrypted key "
                       "(the registry starts unattended and cannot ask for a pass phrase)")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """What a TLS listener presents; OSError or ssl.SSLError if the files do
    not load, EncryptedKey if the key needs a pass phrase (never prompts)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file, password=_no_pass_phrase)
    return context


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """What a dialler checks a wss:// peer against: `ca_file` (PEM), or the
    system's trust store when None; the certificate must name the host dialled."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# ------------------------------------------------------------ node links
#
# Nodes' links to each other: each node serves wss:// with a certificate it
# signs itself for its identity key (Ed25519), and a dialler pins the key
# the registry lists for the node it dials (actors.ws, tls_pin): no CA, and
# nothing to issue, rotate or mount; the registry's binding of names to keys
# is what vouches for a peer, as it already does in the link handshake.

PEER_CERT_FILE = "node-tls.crt"


def peer_certificate(key: Ed25519PrivateKey, node_id: str, ipv6: str) -> bytes:
    """A self-signed certificate (PEM) for a node's identity key, naming the
    node and its address (for people reading it: dialers check the key)."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=MAX_DAYS))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ipv6))]), critical=False)
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def peer_server_context(key: Ed25519PrivateKey, key_file: str, node_id: str, ipv6: str,
                        data_dir: str) -> ssl.SSLContext:
    """The context a node's wss:// listener presents: a fresh self-signed
    certificate for `key` (its PEM in `key_file`), written to
    `data_dir/PEER_CERT_FILE` (ssl loads certificates from files only). TLS
    1.3: Ed25519 signatures in the handshake."""
    path = os.path.join(data_dir, PEER_CERT_FILE)
    with open(path, "wb") as f:
        f.write(peer_certificate(key, node_id, ipv6))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(path, key_file, password=_no_pass_phrase)
    return context


def peer_pin(public_key: str) -> bytes:
    """The DER SubjectPublicKeyInfo of a node key as the registry lists it
    (base64url of the raw Ed25519 key): what actors.ws pins. ValueError if
    it is not one."""
    from trustnet.identity import IdentityError, public_key_from_text
    try:
        key = public_key_from_text(public_key)
    except IdentityError as exc:
        raise ValueError(str(exc)) from None
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


MAX_DAYS = 36_500
# A DNS name a certificate can carry: dot-separated labels of letters, digits
# and inner hyphens (an optional leading "*." wildcard).
_DNS_NAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")


def subject_name(host: str) -> x509.GeneralName:
    """The certificate entry for `host`: an IP address (brackets allowed) or a
    DNS name; ValueError naming the problem otherwise."""
    text = host.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if "%" in bare:
        raise ValueError(f"{host!r}: a scoped address (%zone) cannot be named in a certificate")
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise ValueError(f"{host!r} is neither an IP address nor a DNS name "
                         "(give the host alone, no scheme or port)")
    return x509.DNSName(text.rstrip(".").lower())


@attrs.frozen
class Certificates:
    """PEM bytes: a private CA and a certificate it issued, with their keys."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes


def make_certificates(hosts: list[str], days: int = 825,
                      name: str = "trustnet registry") -> Certificates:
    """A new CA (P-256) and a server certificate for `hosts`: each an IP
    address (an IP SAN) or a DNS name. ValueError if `hosts` is empty, a host
    is neither, or `days` is outside 1..MAX_DAYS."""
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be 1..{MAX_DAYS}, got {days}")
    sans = list(dict.fromkeys(subject_name(host) for host in hosts))
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    return Certificates(ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
                        ca_key=pem_key(ca_key),
                        cert=cert.public_bytes(serialization.Encoding.PEM), key=pem_key(key))


def write_certificates(certs: Certificates, directory: str) -> dict[str, str]:
    """ca.pem, cert.pem and key.pem (mode 0600) in `directory` (created if
    missing); returns their paths by name. The CA's key is not written: the
    CA has issued what it will ever issue, so a leaked directory cannot mint
    certificates its clients trust. Refuses to overwrite anything
    (FileExistsError) and leaves nothing half-written behind."""
    os.makedirs(directory, exist_ok=True)
    files = {"ca.pem": (certs.ca_cert, 0o644), "cert.pem": (certs.cert, 0o644),
             "key.pem": (certs.key, 0o600)}
    paths = {name: os.path.join(directory, name) for name in files}
    for path in paths.values():
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; remove it or pick another directory")
    written: list[str] = []
    try:
        for name, (data, mode) in files.items():
            # O_EXCL|O_NOFOLLOW: never through a link planted meanwhile
            fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            written.append(paths[name])
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException:
        for path in written:
            os.unlink(path)
        raise
    return paths
