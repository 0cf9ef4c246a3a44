"""TLS on the gRPC and HTTP ports: tritonclient over TLS with a certificate made here,
mutual TLS, and a certificate replaced on disk served to the next connection."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import serve
from test_tritonclient import reference


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate(cn, issuer=None, ca=False):
    """A key and a certificate for `cn`, signed by `issuer` (key, cert) or by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    signer_key, signer_name = (issuer[0], issuer[1].subject) if issuer else (key, name(cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return key, builder.sign(signer_key, hashes.SHA256())


def write(path, key, cert):
    """Write a key and certificate pair, each file replaced at once."""
    for suffix, data in [(".key", key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())),
                         (".crt", cert.public_bytes(serialization.Encoding.PEM))]:
        tmp = f"{path}{suffix}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, f"{path}{suffix}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = certificate("sluice test CA", ca=True)
    write(d / "ca", *ca)
    write(d / "server", *certificate("first", issuer=ca))
    write(d / "client", *certificate("a client", issuer=ca))
    return d, ca


def context(d, client_cert=False):
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
    return ctx


def tls_flags(d, mutual=False):
    flags = ["--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key")]
    return flags + (["--tls-client-ca-file", str(d / "ca.crt")] if mutual else [])


def port(url):
    return int(url.rsplit(":", 1)[1])


def peer_name(d, address, client_cert=False):
    """The common name of the certificate the server presents on a new connection."""
    with socket.create_connection(address, timeout=10) as raw:
        with context(d, client_cert).wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


@pytest.fixture(scope="module")
def tls_server(pki):
    d, _ = pki
    yield from serve(tls_flags(d), tls_context=context(d))


def test_tritonclient_over_tls(pki, tls_server):
    d, _ = pki
    x, expected = reference("mlp")
    grpc = grpcclient.InferenceServerClient(tls_server.grpc_url, ssl=True,
                                            root_certificates=str(d / "ca.crt"))
    inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer("mlp", [inp]).as_numpy("OUTPUT__0"), expected, rtol=0, atol=1e-5)
    grpc.close()
    http = httpclient.InferenceServerClient(tls_server.http_url.removeprefix("https://"), ssl=True,
                                            ssl_options={"ca_certs": str(d / "ca.crt")})
    assert http.is_server_ready()
    inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(http.infer("mlp", [inp]).as_numpy("OUTPUT__0"), expected, rtol=0, atol=1e-5)
    http.close()


def test_probes_answer_on_the_plain_metrics_port(tls_server):
    base = tls_server.metrics_url.removesuffix("/metrics")
    for path in ("/v2/health/live", "/v2/health/ready"):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            assert r.status == 200


def test_plain_clients_are_not_served_on_a_tls_port(tls_server):
    grpc = grpcclient.InferenceServerClient(tls_server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        grpc.is_server_live(client_timeout=5)
    assert "UNAVAILABLE" in str(e.value.status()), e.value
    grpc.close()


def test_a_replaced_certificate_is_served_to_the_next_connection(pki, tls_server):
    d, ca = pki
    address = ("127.0.0.1", port(tls_server.http_url))
    assert peer_name(d, address) == "first"
    # An open connection keeps its certificate; a new one gets the replacement.
    open_conn = context(d).wrap_socket(socket.create_connection(address, timeout=10),
                                       server_hostname="127.0.0.1")
    # `write` replaces each file with a new one (a new inode), as a renewal would.
    write(d / "server", *certificate("second", issuer=ca))
    try:
        assert peer_name(d, address) == "second"
        assert peer_name(d, ("127.0.0.1", port("x:" + tls_server.grpc_url))) == "second"
        open_conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert open_conn.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        open_conn.close()


def test_mutual_tls_refuses_a_client_without_a_certificate(pki):
    d, _ = pki
    gen = serve(tls_flags(d, mutual=True), tls_context=context(d, client_cert=True))
    server = next(gen)
    try:
        address = ("127.0.0.1", port(server.http_url))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with socket.create_connection(address, timeout=10) as raw:
                with context(d).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    # TLS 1.3 reports the refusal on the first read after the handshake.
                    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                    if not s.recv(100):
                        raise ConnectionError("closed without an answer")
        assert peer_name(d, address, client_cert=True) in ("first", "second")
        grpc = grpcclient.InferenceServerClient(
            server.grpc_url, ssl=True, root_certificates=str(d / "ca.crt"),
            private_key=str(d / "client.key"), certificate_chain=str(d / "client.crt"))
        assert grpc.is_server_live()
        grpc.close()
    finally:
        gen.close()


def test_a_change_that_does_not_load_keeps_the_previous_certificate(pki, tls_server):
    d, ca = pki
    address = ("127.0.0.1", port(tls_server.http_url))
    before = peer_name(d, address)
    # A key that does not match the certificate: refused, the previous pair still served.
    key, cert = certificate("third", issuer=ca)
    other_key, _ = certificate("unused", issuer=ca)
    write(d / "server", other_key, cert)
    assert peer_name(d, address) == before
    # Once the pair matches again it is taken (after the retry pause).
    write(d / "server", key, cert)
    deadline = time.monotonic() + 10
    while peer_name(d, address) != "third":
        assert time.monotonic() < deadline, "the repaired pair was never taken"
        time.sleep(0.2)
