"""Certificates and TLS contexts: the cluster CA, one certificate per node, and the SSLContexts built on them.

`./run_cluster.sh start` calls `create_cluster_tls` once, when it generates a
cluster: a CA (certificate and key) and, signed by it, one certificate per node
whose subject alternative names hold the node's host (so that HTTPS clients
can check the host they dialled) and the URI ``urn:tokenvault:node:<id>`` (so
that a peer can tell which member is on the other end of a link). The common
name is the node id as well, for people reading the certificate.

Every file a node uses is checked before it serves (`load_node_tls`): a missing,
unreadable or malformed file, a key that does not belong to its certificate, a
certificate not signed by the cluster CA or outside its validity period, or one
that names another node or several, each gives a `TlsError` that names the file and what is wrong and never contains key
material. Private keys are written with mode 0600 and must not be readable by
group or others when read back.

Only the `cryptography` package generates and checks keys; the stdlib `ssl`
module only runs the protocol.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokenvault.smallfiles import write_whole

NODE_IDENTITY_URI_PREFIX = "urn:tokenvault:node:"
CA_VALIDITY_DAYS = 3650
NODE_VALIDITY_DAYS = 825
MAX_PEM_FILE_BYTES = 256 * 1024
# A CA file holds one CA, or a few while the members move to a new one.
MAX_CA_CERTIFICATES = 8
# Certificates become valid a little in the past so that a node whose clock is
# slightly behind the generating machine's still accepts them.
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(minutes=5)
CA_CERT_FILE_NAME = "ca.crt"
CA_KEY_FILE_NAME = "ca.key"


class TlsError(Exception):
    """A certificate or key file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class NodeTlsFiles:
    """The three files one node needs: its certificate, its private key and the cluster CA."""

    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass(frozen=True, slots=True)
class ClusterTlsFiles:
    ca_cert_file: Path
    ca_key_file: Path
    nodes: Mapping[str, NodeTlsFiles]


# ---------------------------------------------------------------- writing


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (it must not exist) with `mode`, write, fsync; the mode is set before any byte lands."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(descriptor, mode)
        write_whole(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_file(path, pem, 0o600)


def _write_certificate(path: Path, certificate: x509.Certificate) -> None:
    _write_file(path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def create_ca(cert_file: Path, key_file: Path, common_name: str = "TokenVault cluster CA",
              valid_days: int = CA_VALIDITY_DAYS) -> x509.Certificate:
    """A new self-signed CA (EC P-256) written to `cert_file` and `key_file` (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE).not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_file, key)
    _write_certificate(cert_file, certificate)
    return certificate


def node_identity_uri(node_id: str) -> str:
    return NODE_IDENTITY_URI_PREFIX + node_id


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_node_certificate(ca_cert_file: Path, ca_key_file: Path, node_id: str, hosts: Sequence[str],
                            cert_file: Path, key_file: Path,
                            valid_days: int = NODE_VALIDITY_DAYS) -> x509.Certificate:
    """A certificate for one node, signed by the CA: usable as TLS server and as TLS client (peer links)."""
    ca_certificate = load_certificate(ca_cert_file, "CA certificate")
    ca_key = load_private_key(ca_key_file, "CA key")
    ca_public_key = ca_certificate.public_key()
    # The cluster CA this module makes is an EC key; a key of a kind it cannot sign with is named, not used.
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(ca_public_key, ec.EllipticCurvePublicKey):
        raise TlsError(f"CA key file {str(ca_key_file)!r} is not an elliptic-curve key, which the cluster CA is")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    alternative_names = [*_host_names(hosts), x509.UniformResourceIdentifier(node_identity_uri(node_id))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE).not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(key_file, key)
    _write_certificate(cert_file, certificate)
    return certificate


def create_cluster_tls(directory: Path, nodes: Mapping[str, Sequence[str]]) -> ClusterTlsFiles:
    """The CA and one certificate per node (id -> its host names/addresses) under `directory` (created, 0700)."""
    directory.mkdir(mode=0o700, exist_ok=False)
    ca_cert_file, ca_key_file = directory / CA_CERT_FILE_NAME, directory / CA_KEY_FILE_NAME
    create_ca(ca_cert_file, ca_key_file)
    files = {}
    for node_id, hosts in nodes.items():
        cert_file, key_file = directory / f"{node_id}.crt", directory / f"{node_id}.key"
        create_node_certificate(ca_cert_file, ca_key_file, node_id, hosts, cert_file, key_file)
        files[node_id] = NodeTlsFiles(cert_file, key_file, ca_cert_file)
    return ClusterTlsFiles(ca_cert_file, ca_key_file, files)


# ---------------------------------------------------------------- reading and checking


def _read_pem(path: Path, what: str, private: bool) -> bytes:
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TlsError(f"{what} file {str(path)!r} does not exist") from None
    except OSError as error:
        raise TlsError(f"{what} file {str(path)!r} cannot be opened ({error.strerror})") from None
    except ValueError:  # a path with a NUL in it, which no file has (a ca_file from cluster.json, say)
        raise TlsError(f"{what} file {str(path)!r} cannot be opened (its path holds a NUL character)") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise TlsError(f"{what} file {str(path)!r} is not a regular file")
        if private and status.st_mode & 0o077:
            raise TlsError(f"{what} file {str(path)!r} is readable by group or others "
                           f"(mode {stat.S_IMODE(status.st_mode):04o}); it must be 0600")
        if status.st_size > MAX_PEM_FILE_BYTES:
            raise TlsError(f"{what} file {str(path)!r} is larger than {MAX_PEM_FILE_BYTES} bytes")
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            data = handle.read(MAX_PEM_FILE_BYTES + 1)
    except OSError as error:
        raise TlsError(f"{what} file {str(path)!r} cannot be read ({error.strerror})") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_PEM_FILE_BYTES:
        raise TlsError(f"{what} file {str(path)!r} is larger than {MAX_PEM_FILE_BYTES} bytes")
    return data


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    data = _read_pem(path, what, private=False)
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        # The parser's message may quote the file's bytes; say only what kind of thing is wrong.
        raise TlsError(f"{what} file {str(path)!r} does not hold a PEM certificate") from None
    return _fully_parsed(certificate, path, what)


def _fully_parsed(certificate: x509.Certificate, path: Path, what: str) -> x509.Certificate:
    """``certificate`` once its extensions and public key parse. x509 parses them only when first read, so a
    malformed one raised ValueError or UnsupportedAlgorithm from the checks that read them, not a TlsError
    naming the file."""
    try:
        certificate.extensions  # read to be parsed: x509 keeps what it parsed
        certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"{what} file {str(path)!r} holds a certificate whose extensions or public key cannot "
                       f"be parsed") from None
    return certificate


def load_ca_certificates(path: Path, what: str = "CA certificate") -> list[x509.Certificate]:
    """Every certificate of a CA file: one CA, or several while members move to a new one."""
    data = _read_pem(path, what, private=False)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{what} file {str(path)!r} does not hold PEM certificates") from None
    if len(certificates) > MAX_CA_CERTIFICATES:
        raise TlsError(f"{what} file {str(path)!r} holds more than {MAX_CA_CERTIFICATES} certificates")
    return [_fully_parsed(certificate, path, what) for certificate in certificates]


def load_private_key(path: Path, what: str = "private key") -> PrivateKeyTypes:
    data = _read_pem(path, what, private=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(f"{what} file {str(path)!r} is encrypted; give an unencrypted key (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"{what} file {str(path)!r} does not hold a PEM private key") from None


def _public_bytes(key: Any) -> bytes:
    encoded: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return encoded


def _check_validity(certificate: x509.Certificate, path: Path, what: str, now: datetime.datetime) -> None:
    if now < certificate.not_valid_before_utc:
        raise TlsError(f"{what} file {str(path)!r} is not valid before "
                       f"{certificate.not_valid_before_utc.isoformat()}")
    if now > certificate.not_valid_after_utc:
        raise TlsError(f"{what} file {str(path)!r} expired on {certificate.not_valid_after_utc.isoformat()}")


def certificate_node_ids(certificate: x509.Certificate) -> tuple[str, ...]:
    """The node ids a certificate names through its ``urn:tokenvault:node:`` URIs."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return tuple(uri[len(NODE_IDENTITY_URI_PREFIX):] for uri in uris if uri.startswith(NODE_IDENTITY_URI_PREFIX))


def check_node_files(files: NodeTlsFiles, node_id: str | None = None,
                     now: datetime.datetime | None = None) -> x509.Certificate:
    """Raise TlsError unless the three files form a usable identity; returns the node's certificate."""
    return _checked_certificates(files, node_id, now)[0]


def _checked_certificates(files: NodeTlsFiles, node_id: str | None,
                          now: datetime.datetime | None) -> tuple[x509.Certificate, x509.Certificate]:
    """check_node_files: the node's certificate, and of the CA file's certificates the one that expires
    first (each must be within its validity), once all are checked. The node's certificate must be
    signed by one of them: a file of two CAs lets members move to a new CA without a link refused."""
    now = now or _now()
    ca_certificates = load_ca_certificates(files.ca_file)
    for ca_certificate in ca_certificates:
        _check_validity(ca_certificate, files.ca_file, "CA certificate", now)
        if not _is_ca(ca_certificate):
            raise TlsError(f"CA certificate file {str(files.ca_file)!r} holds a certificate that is not a CA "
                           "(its basic constraints do not say CA)")
    certificate = load_certificate(files.cert_file, "node certificate")
    _check_validity(certificate, files.cert_file, "node certificate", now)
    key = load_private_key(files.key_file, "node private key")
    if _public_bytes(key.public_key()) != _public_bytes(certificate.public_key()):
        raise TlsError(f"node private key file {str(files.key_file)!r} does not belong to the certificate "
                       f"{str(files.cert_file)!r}")
    if not any(_issued_by(certificate, ca_certificate) for ca_certificate in ca_certificates):
        raise TlsError(f"node certificate {str(files.cert_file)!r} is not signed by "
                       f"{'the CA' if len(ca_certificates) == 1 else 'any CA'} in {str(files.ca_file)!r}")
    missing = _missing_key_usages(certificate)
    if missing:
        # The peer links use one certificate at both ends: the dialer's as a client's, the acceptor's as a
        # server's; the other member would refuse every link it makes or takes.
        raise TlsError(f"node certificate {str(files.cert_file)!r} may not be used for {' and '.join(missing)} "
                       "authentication, which the peer links need (extended key usage)")
    named = set(certificate_node_ids(certificate))
    if node_id is not None and node_id not in named:
        raise TlsError(f"node certificate {str(files.cert_file)!r} does not name node {node_id!r} "
                       f"(expected the subject alternative name {node_identity_uri(node_id)})")
    if len(named) > 1:
        # A peer takes the member on the other end of a link from this name: a certificate of several would
        # let whoever holds its key pose as each of them.
        raise TlsError(f"node certificate {str(files.cert_file)!r} names {len(named)} nodes; a node certificate "
                       f"must name its own node only (one subject alternative name {NODE_IDENTITY_URI_PREFIX}<id>)")
    return certificate, min(ca_certificates, key=lambda ca_certificate: ca_certificate.not_valid_after_utc)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _missing_key_usages(certificate: x509.Certificate) -> list[str]:
    """Of server and client, the uses a certificate's extended key usage leaves out (none without one)."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [name for name, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                                     ("client", ExtendedKeyUsageOID.CLIENT_AUTH)) if usage not in usages]


def _issued_by(certificate: x509.Certificate, ca_certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# ---------------------------------------------------------------- SSL contexts


def _base_context(purpose: int, minimum: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = minimum
    return context


def _load_chain(context: ssl.SSLContext, files: NodeTlsFiles) -> None:
    try:
        context.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (ssl.SSLError, OSError) as error:
        raise TlsError(f"the certificate {str(files.cert_file)!r} and key {str(files.key_file)!r} cannot be "
                       f"loaded ({type(error).__name__})") from None


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as error:
        raise TlsError(f"the CA certificate {str(ca_file)!r} cannot be loaded ({type(error).__name__})") from None


def http_server_context(files: NodeTlsFiles) -> ssl.SSLContext:
    """HTTPS for the API: TLS 1.2 or newer, the node's certificate; clients are not asked for one."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, ssl.TLSVersion.TLSv1_2)
    _load_chain(context, files)
    return context


def http_client_context(ca_file: Path | str) -> ssl.SSLContext:
    """For clients of the API: verify the node's certificate against the cluster CA and the host name."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, ssl.TLSVersion.TLSv1_2)
    load_ca_certificates(Path(ca_file))
    _load_ca(context, Path(ca_file))
    return context


def peer_server_context(files: NodeTlsFiles) -> ssl.SSLContext:
    """The accepting end of a peer link: TLS 1.3, and the dialer must present a certificate from the CA."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, ssl.TLSVersion.TLSv1_3)
    _load_chain(context, files)
    _load_ca(context, files.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_client_context(files: NodeTlsFiles) -> ssl.SSLContext:
    """The dialing end of a peer link: presents the node's certificate and verifies the acceptor's."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, ssl.TLSVersion.TLSv1_3)
    _load_chain(context, files)
    _load_ca(context, files.ca_file)
    return context


def peer_node_ids(peer_certificate: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The node ids named by a verified peer certificate as `ssl.SSLObject.getpeercert()` returns it."""
    if not peer_certificate:
        return ()
    names = peer_certificate.get("subjectAltName", ())
    return tuple(value[len(NODE_IDENTITY_URI_PREFIX):] for kind, value in names
                 if kind == "URI" and isinstance(value, str) and value.startswith(NODE_IDENTITY_URI_PREFIX))


@dataclass(frozen=True, slots=True)
class PeerTlsContexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class NodeTls:
    """What a node serves with: its HTTPS server context, its peer-link contexts, and when the
    certificates those were built from stop being valid, by "node" and "ca"."""
    http_server: ssl.SSLContext
    peers: PeerTlsContexts
    expires_at: Mapping[str, datetime.datetime]


def load_node_tls(files: NodeTlsFiles, node_id: str) -> NodeTls:
    """Check a node's files and build its HTTPS server context and its peer-link contexts."""
    certificate, ca_certificate = _checked_certificates(files, node_id, None)
    return NodeTls(http_server_context(files), PeerTlsContexts(peer_server_context(files), peer_client_context(files)),
                   {"node": certificate.not_valid_after_utc, "ca": ca_certificate.not_valid_after_utc})


def reload_http_server_context(context: ssl.SSLContext, files: NodeTlsFiles, node_id: str) -> x509.Certificate:
    """Load the node's certificate and key again into ``context``, checked as at start; raises TlsError and
    changes nothing when they are not usable. New handshakes present them; connections made keep theirs."""
    certificate, _ = _checked_certificates(files, node_id, None)
    http_server_context(files)  # loads the files once aside, so that a file OpenSSL refuses changes nothing
    _load_chain(context, files)
    return certificate


def reload_node_tls(node_tls: NodeTls, files: NodeTlsFiles, node_id: str) -> Mapping[str, datetime.datetime]:
    """Certificate rotation without a restart: the node's files, checked as at start, loaded again into the
    contexts it serves HTTPS and peer links with; returns when the new certificates expire. The CA file is
    added to the CAs the peer links trust (one it replaces stays trusted until the node restarts, so that
    members can move to a new CA one at a time). Raises TlsError and changes nothing when the files are not
    usable; links and connections already made keep their certificates."""
    certificate, ca_certificate = _checked_certificates(files, node_id, None)
    for build in (http_server_context, peer_server_context, peer_client_context):
        build(files)  # loaded aside first, so that a file OpenSSL refuses changes nothing
    _load_chain(node_tls.http_server, files)
    for context in (node_tls.peers.server, node_tls.peers.client):
        _load_chain(context, files)
        _load_ca(context, files.ca_file)
    return {"node": certificate.not_valid_after_utc, "ca": ca_certificate.not_valid_after_utc}
