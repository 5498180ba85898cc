"""tokenvault.crypto.tls: the cluster CA, node certificates, file checks and the SSL contexts built on them."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from node_support import make_configs, write_certificate_naming
from tokenvault.config import TlsConfig, write_node_config
from tokenvault.crypto import tls
from tokenvault.crypto.tls import NodeTlsFiles, TlsError


@pytest.fixture(scope="module")
def cluster_files(tmp_path_factory: pytest.TempPathFactory) -> tls.ClusterTlsFiles:
    directory = tmp_path_factory.mktemp("tls") / "tls"
    return tls.create_cluster_tls(directory, {"n1": ["127.0.0.1"], "n2": ["127.0.0.1", "vault-2.example"]})


def test_generation_writes_a_ca_and_one_certificate_per_node(cluster_files: tls.ClusterTlsFiles) -> None:
    ca = tls.load_certificate(cluster_files.ca_cert_file)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert set(cluster_files.nodes) == {"n1", "n2"}
    for node_id, files in cluster_files.nodes.items():
        certificate = tls.check_node_files(files, node_id)
        assert certificate.issuer == ca.subject
        assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == node_id
        assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_node_certificates_name_the_host_and_the_node(cluster_files: tls.ClusterTlsFiles) -> None:
    names = tls.load_certificate(cluster_files.nodes["n2"].cert_file).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["vault-2.example"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:tokenvault:node:n2"]
    assert tls.certificate_node_ids(tls.load_certificate(cluster_files.nodes["n1"].cert_file)) == ("n1",)


def test_private_keys_are_written_mode_0600(cluster_files: tls.ClusterTlsFiles) -> None:
    keys = [cluster_files.ca_key_file, *(files.key_file for files in cluster_files.nodes.values())]
    for key_file in keys:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    assert stat.S_IMODE(cluster_files.ca_cert_file.parent.stat().st_mode) == 0o700


def _copy(source: Path, target: Path, mode: int = 0o600) -> Path:
    target.write_bytes(source.read_bytes())
    target.chmod(mode)
    return target


def _expect_error(files: NodeTlsFiles, *fragments: str, node_id: str | None = None) -> str:
    with pytest.raises(TlsError) as caught:
        tls.check_node_files(files, node_id)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    # Never key material: no PEM armour and no base64 body of the key file in the message.
    assert "BEGIN" not in message and "PRIVATE" not in message
    return message


def test_a_missing_file_is_named(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    missing = tmp_path / "nowhere.crt"
    _expect_error(NodeTlsFiles(missing, files.key_file, files.ca_file), str(missing), "does not exist")


def test_a_key_readable_by_others_is_refused(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    loose = _copy(files.key_file, tmp_path / "loose.key", 0o644)
    _expect_error(NodeTlsFiles(files.cert_file, loose, files.ca_file), str(loose), "0644", "0600")


def test_an_unreadable_file_is_named(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    directory = tmp_path / "a-directory.crt"
    directory.mkdir()
    _expect_error(NodeTlsFiles(directory, files.key_file, files.ca_file), str(directory), "not a regular file")


def test_garbage_in_place_of_a_certificate_or_key(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    garbage.chmod(0o600)
    _expect_error(NodeTlsFiles(garbage, files.key_file, files.ca_file), str(garbage),
                  "does not hold a PEM certificate")
    _expect_error(NodeTlsFiles(files.cert_file, garbage, files.ca_file), str(garbage),
                  "does not hold a PEM private key")


def test_an_encrypted_key_is_refused_with_a_clear_message(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    key = tls.load_private_key(files.key_file)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    encrypted.chmod(0o600)
    _expect_error(NodeTlsFiles(files.cert_file, encrypted, files.ca_file), str(encrypted), "is encrypted")


def test_a_key_that_belongs_to_another_certificate(cluster_files: tls.ClusterTlsFiles) -> None:
    n1, n2 = cluster_files.nodes["n1"], cluster_files.nodes["n2"]
    _expect_error(NodeTlsFiles(n1.cert_file, n2.key_file, n1.ca_file), str(n2.key_file), "does not belong")


def test_a_certificate_from_another_ca(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    other = tls.create_cluster_tls(tmp_path / "other", {"n1": ["127.0.0.1"]})
    files = cluster_files.nodes["n1"]
    _expect_error(NodeTlsFiles(other.nodes["n1"].cert_file, other.nodes["n1"].key_file, files.ca_file),
                  "not signed by the CA", str(files.ca_file))


def test_a_certificate_for_another_node(cluster_files: tls.ClusterTlsFiles) -> None:
    _expect_error(cluster_files.nodes["n2"], "does not name node 'n1'", node_id="n1")


def test_a_node_certificate_naming_several_nodes_is_refused_when_loaded(
        cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    """A peer takes the member on the other end of a link from the certificate's node ids: one of several
    (signed by the cluster CA) passed the checks with any of its ids (checked on the code before), and
    whoever held its key could pose as each member it names."""
    files = write_certificate_naming(cluster_files.ca_cert_file, cluster_files.ca_key_file, ["n1", "n2"],
                                     tmp_path, "two")
    for node_id in ("n1", "n2", None):
        message = _expect_error(files, str(files.cert_file), "names 2 nodes", "urn:tokenvault:node:<id>",
                                node_id=node_id)
        assert "BEGIN" not in message
    with pytest.raises(TlsError, match="names 2 nodes"):
        tls.load_node_tls(files, "n1")
    # The same certificate naming one node only is usable.
    one = write_certificate_naming(cluster_files.ca_cert_file, cluster_files.ca_key_file, ["n1"], tmp_path, "one")
    assert tls.certificate_node_ids(tls.check_node_files(one, "n1")) == ("n1",)


def test_an_expired_certificate_and_one_not_yet_valid(cluster_files: tls.ClusterTlsFiles) -> None:
    files = cluster_files.nodes["n1"]
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=tls.NODE_VALIDITY_DAYS + 1)
    with pytest.raises(TlsError, match="expired on"):
        tls.check_node_files(files, "n1", now=later)
    earlier = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    with pytest.raises(TlsError, match="not valid before"):
        tls.check_node_files(files, "n1", now=earlier)


def test_an_expired_certificate_on_disk_is_refused(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    cert_file, key_file = tmp_path / "old.crt", tmp_path / "old.key"
    tls.create_node_certificate(files.ca_file, cluster_files.ca_key_file, "n1", ["127.0.0.1"], cert_file, key_file,
                                valid_days=0)
    # valid_days=0 ends validity now; a moment later it has expired.
    _expect_error(NodeTlsFiles(cert_file, key_file, files.ca_file), str(cert_file), "expired")


def test_generation_refuses_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    with pytest.raises(FileExistsError):
        tls.create_cluster_tls(tmp_path / "tls", {"n1": ["127.0.0.1"]})


def test_contexts_require_tls_1_2_for_http_and_1_3_and_client_certificates_for_peers(
        cluster_files: tls.ClusterTlsFiles) -> None:
    files = cluster_files.nodes["n1"]
    loaded = tls.load_node_tls(files, "n1")
    http_server, peers = loaded.http_server, loaded.peers
    assert loaded.expires_at == {
        "node": tls.load_certificate(files.cert_file).not_valid_after_utc,
        "ca": tls.load_certificate(files.ca_file).not_valid_after_utc}
    assert loaded.expires_at["node"] != loaded.expires_at["ca"]
    assert http_server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert http_server.verify_mode == ssl.CERT_NONE
    client = tls.http_client_context(files.ca_file)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert peers.server.verify_mode == ssl.CERT_REQUIRED and peers.server.minimum_version == ssl.TLSVersion.TLSv1_3
    assert peers.client.verify_mode == ssl.CERT_REQUIRED and peers.client.check_hostname


def test_http_client_context_with_a_bad_ca_file(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="does not exist"):
        tls.http_client_context(tmp_path / "missing-ca.crt")
    # A path with a NUL (JSON can write one in cluster.json's ca_file) raised ValueError from os.open.
    with pytest.raises(TlsError, match="its path holds a NUL character"):
        tls.http_client_context(tmp_path / "ca\x00.crt")


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext,
                     server_hostname: str = "127.0.0.1") -> dict | None:
    """One TLS connection over 127.0.0.1; returns the server's view of the client certificate."""
    seen: list[dict | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server_socket = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = server_socket.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname)
        assert await reader.read(2) == b"ok"
        writer.close()
    finally:
        server_socket.close()
    return seen[0] if seen else None


async def test_an_https_client_trusts_the_node_only_through_the_cluster_ca(
        cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    files = cluster_files.nodes["n1"]
    server = tls.load_node_tls(files, "n1").http_server
    await _handshake(server, tls.http_client_context(files.ca_file))
    other = tls.create_cluster_tls(tmp_path / "other", {"n1": ["127.0.0.1"]})
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(server, tls.http_client_context(other.ca_cert_file))
    with pytest.raises(ssl.SSLCertVerificationError):  # the certificate does not name this host
        await _handshake(server, tls.http_client_context(files.ca_file), server_hostname="localhost")


async def test_peer_contexts_carry_the_node_identity_both_ways(cluster_files: tls.ClusterTlsFiles) -> None:
    n1 = tls.load_node_tls(cluster_files.nodes["n1"], "n1").peers
    n2 = tls.load_node_tls(cluster_files.nodes["n2"], "n2").peers
    client_certificate = await _handshake(n2.server, n1.client)
    assert tls.peer_node_ids(client_certificate) == ("n1",)


async def test_members_move_to_a_new_ca_by_reloads_with_no_link_refused_on_the_way(
        cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    """The procedure of docs/security.md: a CA file of both CAs to every member, then new certificates,
    then the new CA alone. Every step's files pass the reload's checks (the second was refused before:
    the node's certificate was checked against the file's first CA only) and, at each step, the two
    members still link both ways."""
    old = cluster_files
    new = tls.create_cluster_tls(tmp_path / "new", {"n1": ["127.0.0.1"], "n2": ["127.0.0.1"]})
    both = tmp_path / "both-cas.crt"
    both.write_bytes(old.ca_cert_file.read_bytes() + new.ca_cert_file.read_bytes())
    nodes = {node_id: tls.load_node_tls(old.nodes[node_id], node_id) for node_id in ("n1", "n2")}

    async def linked() -> None:
        for dialer, acceptor in (("n1", "n2"), ("n2", "n1")):
            seen = await _handshake(nodes[acceptor].peers.server, nodes[dialer].peers.client)
            assert tls.peer_node_ids(seen) == (dialer,)

    def files(node_id: str, certificate_from: tls.ClusterTlsFiles, ca_file: Path) -> NodeTlsFiles:
        return NodeTlsFiles(certificate_from.nodes[node_id].cert_file, certificate_from.nodes[node_id].key_file,
                            ca_file)

    steps = [
        {"n1": files("n1", old, both), "n2": files("n2", old, both)},  # both CAs trusted everywhere
        {"n1": files("n1", new, both)},  # new certificates, one member at a time
        {"n2": files("n2", new, both)},
        {"n1": files("n1", new, new.ca_cert_file), "n2": files("n2", new, new.ca_cert_file)},
    ]
    for step in steps:
        for node_id, node_files in step.items():
            expiry = tls.reload_node_tls(nodes[node_id], node_files, node_id)
            cas = tls.load_ca_certificates(node_files.ca_file)
            assert expiry["ca"] == min(ca.not_valid_after_utc for ca in cas)  # the one to renew first
        await linked()
    # The old CA's certificates are refused against the new CA alone, whatever else the file holds.
    _expect_error(NodeTlsFiles(old.nodes["n1"].cert_file, old.nodes["n1"].key_file, new.ca_cert_file),
                  "not signed by the CA", str(new.ca_cert_file))
    _expect_error(NodeTlsFiles(old.nodes["n1"].cert_file, old.nodes["n1"].key_file, new.nodes["n1"].cert_file),
                  "is not a CA")


def test_a_ca_file_of_too_many_certificates_or_none_is_refused(cluster_files: tls.ClusterTlsFiles,
                                                              tmp_path: Path) -> None:
    many = tmp_path / "many.crt"
    many.write_bytes(cluster_files.ca_cert_file.read_bytes() * (tls.MAX_CA_CERTIFICATES + 1))
    files = cluster_files.nodes["n1"]
    _expect_error(NodeTlsFiles(files.cert_file, files.key_file, many), "more than 8 certificates")
    empty = tmp_path / "empty.crt"
    empty.write_bytes(b"no certificate here\n")
    _expect_error(NodeTlsFiles(files.cert_file, files.key_file, empty), "does not hold PEM certificates")


def _malformed_certificate(cluster_files: tls.ClusterTlsFiles, tmp_path: Path, case: str) -> NodeTlsFiles:
    """n1's files with a certificate that x509 loads but cannot parse in full: "node certificate with a
    malformed subject alternative name" or "... with a public key of an unknown type" (signed by the
    cluster CA, with their key), or "CA certificate with malformed basic constraints" (self-signed)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID

    good = cluster_files.nodes["n1"]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1")])
    builder = (x509.CertificateBuilder().subject_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if case.startswith("CA certificate"):
        broken = x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x01\x01")
        certificate = builder.issuer_name(name).add_extension(broken, critical=True).sign(key, hashes.SHA256())
        ca_file = tmp_path / "malformed-ca.crt"
        ca_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return dataclasses.replace(good, ca_file=ca_file)
    ca = tls.load_certificate(cluster_files.ca_cert_file)
    ca_key = tls.load_private_key(cluster_files.ca_key_file)
    builder = builder.issuer_name(ca.subject)
    if "alternative name" in case:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x01\x01"), critical=False)
    der = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]
    if "unknown type" in case:
        ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # the OID id-ecPublicKey, in DER
        der = der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"))  # an OID no library knows
    cert_file, key_file = tmp_path / "malformed.crt", tmp_path / "malformed.key"
    cert_file.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return dataclasses.replace(good, cert_file=cert_file, key_file=key_file)


MALFORMED_CERTIFICATES = ["node certificate with a malformed subject alternative name",
                          "node certificate with a public key of an unknown type",
                          "CA certificate with malformed basic constraints"]


@pytest.mark.parametrize("case", MALFORMED_CERTIFICATES)
def test_a_certificate_whose_extensions_or_key_do_not_parse_is_refused_naming_the_file(
        cluster_files: tls.ClusterTlsFiles, tmp_path: Path, case: str) -> None:
    """x509 parses a certificate's extensions and public key only when they are first read: such a
    certificate loaded, and the checks that read them raised ValueError or UnsupportedAlgorithm, not a
    TlsError (a traceback at `tokenvault serve`, no tls.reload_failed on SIGHUP)."""
    files = _malformed_certificate(cluster_files, tmp_path, case)
    named = files.ca_file if case.startswith("CA") else files.cert_file
    _expect_error(files, str(named), "whose extensions or public key cannot be parsed", node_id="n1")
    with pytest.raises(TlsError):
        tls.load_node_tls(files, "n1")
    if case.startswith("CA"):
        with pytest.raises(TlsError, match="cannot be parsed"):
            tls.http_client_context(files.ca_file)


def test_a_node_certificate_the_peer_links_cannot_use_is_refused_when_loaded(
        cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    """A certificate brought through [tls] whose extended key usage leaves out client (or server)
    authentication passed the checks, and every link the node dialed was refused by the other member
    (checked on the code before): the same certificate serves both ends of a peer link."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = tls.load_certificate(cluster_files.ca_cert_file)
    ca_key = tls.load_private_key(cluster_files.ca_key_file)
    for usages, missing in (([ExtendedKeyUsageOID.SERVER_AUTH], "client"),
                            ([ExtendedKeyUsageOID.CLIENT_AUTH], "server")):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.UniformResourceIdentifier(tls.node_identity_uri("n1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        cert_file, key_file = tmp_path / f"{missing}.crt", tmp_path / f"{missing}.key"
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(key_file, 0o600)
        message = _expect_error(NodeTlsFiles(cert_file, key_file, cluster_files.ca_cert_file), str(cert_file),
                                f"may not be used for {missing} authentication", node_id="n1")
        with pytest.raises(TlsError):
            tls.load_node_tls(NodeTlsFiles(cert_file, key_file, cluster_files.ca_cert_file), "n1")
        assert "BEGIN" not in message


def test_peer_node_ids_ignores_other_names() -> None:
    assert tls.peer_node_ids(None) == ()
    assert tls.peer_node_ids({"subjectAltName": (("DNS", "urn:tokenvault:node:n9"), ("URI", "https://x"),
                                                 ("URI", "urn:tokenvault:node:n3"))}) == ("n3",)


def test_no_file_is_group_or_world_writable(cluster_files: tls.ClusterTlsFiles) -> None:
    for path in cluster_files.ca_cert_file.parent.iterdir():
        assert not stat.S_IMODE(os.stat(path).st_mode) & 0o022, path


def test_a_ca_key_of_another_kind_is_named_not_used(cluster_files: tls.ClusterTlsFiles, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key_file = tmp_path / "rsa-ca.key"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_key_file.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    rsa_key_file.chmod(0o600)
    with pytest.raises(TlsError, match="rsa-ca.key.*not an elliptic-curve key"):
        tls.create_node_certificate(cluster_files.ca_cert_file, rsa_key_file, "n3", ["127.0.0.1"],
                                    tmp_path / "n3.crt", tmp_path / "n3.key")
    assert not (tmp_path / "n3.crt").exists()


# ------------------------------------------------------------------ a real `tokenvault serve`

TOKENVAULT = str(Path(sys.executable).parent / "tokenvault")


def _serve_with(tmp_path: Path, files: NodeTlsFiles) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`tokenvault serve` of a one-node config with these TLS files; its result, and its data directory."""
    (config,) = make_configs(tmp_path, 1)
    members = tuple(dataclasses.replace(member, http_url=member.http_url.replace("http://", "https://"))
                    for member in config.members)
    config = dataclasses.replace(config, members=members, log_file=None,
                                 tls=TlsConfig(files.cert_file, files.key_file, files.ca_file))
    path = tmp_path / "node.toml"
    write_node_config(path, config)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TOKENVAULT_")}
    return subprocess.run([TOKENVAULT, "serve", "--config", str(path)], env=environment, capture_output=True,
                          text=True, timeout=60), config.data_dir


def _bad_node_files(cluster_files: tls.ClusterTlsFiles, tmp_path: Path, case: str) -> tuple[NodeTlsFiles, Path]:
    """n1's files with one thing wrong; the file the refusal must name."""
    good = cluster_files.nodes["n1"]
    if case == "certificate missing":
        return dataclasses.replace(good, cert_file=tmp_path / "absent.crt"), tmp_path / "absent.crt"
    if case == "key readable by group":
        key = _copy(good.key_file, tmp_path / "open.key", 0o640)
        return dataclasses.replace(good, key_file=key), key
    if case == "certificate of another node":
        return cluster_files.nodes["n2"], cluster_files.nodes["n2"].cert_file
    if case in MALFORMED_CERTIFICATES:
        files = _malformed_certificate(cluster_files, tmp_path, case)
        return files, files.ca_file if case.startswith("CA") else files.cert_file
    assert case == "certificate from another CA"
    other = tls.create_cluster_tls(tmp_path / "other-tls", {"n1": ["127.0.0.1"]})
    return dataclasses.replace(good, cert_file=other.nodes["n1"].cert_file, key_file=other.nodes["n1"].key_file), \
        other.nodes["n1"].cert_file


@pytest.mark.parametrize("case", ["certificate missing", "key readable by group", "certificate of another node",
                                  "certificate from another CA", *MALFORMED_CERTIFICATES])
def test_a_node_process_with_a_bad_certificate_or_key_refuses_to_start_and_says_why(
        cluster_files: tls.ClusterTlsFiles, tmp_path: Path, case: str) -> None:
    """docs/failure-modes.md, a node's certificate or key file is unusable: the `tokenvault serve` process
    checks the files before anything else and refuses to start with one `error:` line naming the file,
    exit status 2, no traceback and no key material; it never creates its data directory."""
    files, named = _bad_node_files(cluster_files, tmp_path, case)
    result, data_dir = _serve_with(tmp_path, files)
    output = result.stdout + result.stderr
    assert result.returncode == 2, (result.returncode, output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(named) in lines[0], output
    assert "Traceback" not in output and "PRIVATE KEY" not in output
    assert not data_dir.exists(), "the node went on to create its data directory"
