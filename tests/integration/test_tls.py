"""The TCP listener with TLS and mTLS: certificates made here with openssl, a real daemon.

A client must trust the daemon's CA; with --tls-client-ca the daemon also wants a client
certificate signed by that CA. TLS never replaces the bearer token: it still names the tenant.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from corral.runtime.client import Client, ClientError

from .daemon_harness import DaemonProcess

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

TOKEN = "tls-tenant-token-0123456789abcdef"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(dirpath: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=dirpath)


def _leaf(dirpath: Path, name: str, ca: str, *, server: bool) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=dirpath)
    ext = dirpath / f"{name}.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                   f"extendedKeyUsage = {'serverAuth' if server else 'clientAuth'}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem",
             cwd=dirpath)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _leaf(d, "server", "ca", server=True)
    _leaf(d, "client", "ca", server=False)
    _leaf(d, "intruder", "rogue", server=False)
    return d


def _pem(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


def _start(tmp_path_factory, pki: Path, *, mtls: bool) -> DaemonProcess:
    args = ["--listen", "127.0.0.1:0", "--tls-cert", str(pki / "server.pem"),
            "--tls-key", str(pki / "server.key")]
    if mtls:
        args += ["--tls-client-ca", str(pki / "ca.pem")]
    d = DaemonProcess(tmp_path_factory.mktemp("tls"), args=tuple(args),
                      config=f'[tenants.acme]\ntoken = "{TOKEN}"\n').start()
    d.port = json.loads(d.records("daemon.start")[-1].detail_json)["tcp_port"]
    return d


def _code(fn) -> str:
    try:
        fn()
    except ClientError as exc:
        return exc.code.name
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def test_tls_listener_serves_only_clients_that_trust_its_ca(tmp_path_factory, pki):
    d = _start(tmp_path_factory, pki, mtls=False)
    target = f"127.0.0.1:{d.port}"
    try:
        good = Client.connect(target=target, token=TOKEN, root_certificates=_pem(pki, "ca.pem"))
        sb = good.create_sandbox()
        assert sb.tenant == "acme"
        events = list(good.exec(sb.id, ["echo", "over tls"]))
        assert events[-1].exited.returncode == 0
        good.destroy_sandbox(sb.id)
        good.close()
        # plaintext against a TLS port, and TLS with another CA: the handshake fails
        plain = Client(grpc.insecure_channel(target), (("authorization", f"Bearer {TOKEN}"),))
        assert _code(lambda: plain._call(plain.sandboxes.List, _list_request(), 5)) \
            == "UNAVAILABLE"
        plain.close()
        wrong = Client.connect(target=target, token=TOKEN,
                               root_certificates=_pem(pki, "rogue.pem"))
        assert _code(lambda: wrong._call(wrong.sandboxes.List, _list_request(), 5)) \
            == "UNAVAILABLE"
        wrong.close()
        # TLS is not authentication: a wrong token is still refused
        stranger = Client.connect(target=target, token="not-the-token-0123456789abc",
                                  root_certificates=_pem(pki, "ca.pem"))
        assert _code(stranger.list_sandboxes) == "UNAUTHENTICATED"
        stranger.close()
    finally:
        assert d.stop() == 0, d.log()
    assert d.leftovers() == {}


def test_mtls_listener_wants_a_client_certificate_from_its_ca(tmp_path_factory, pki):
    d = _start(tmp_path_factory, pki, mtls=True)
    target = f"127.0.0.1:{d.port}"
    ca = _pem(pki, "ca.pem")
    try:
        anonymous = Client.connect(target=target, token=TOKEN, root_certificates=ca)
        assert _code(lambda: anonymous._call(anonymous.sandboxes.List, _list_request(), 5)) \
            == "UNAVAILABLE"
        anonymous.close()
        intruder = Client.connect(target=target, token=TOKEN, root_certificates=ca,
                                  client_cert=_pem(pki, "intruder.pem"),
                                  client_key=_pem(pki, "intruder.key"))
        assert _code(lambda: intruder._call(intruder.sandboxes.List, _list_request(), 5)) \
            == "UNAVAILABLE"
        intruder.close()
        member = Client.connect(target=target, token=TOKEN, root_certificates=ca,
                                client_cert=_pem(pki, "client.pem"),
                                client_key=_pem(pki, "client.key"))
        assert member.list_sandboxes() == []
        member.close()
        # the CLI verbs take the same material as flags
        cli = subprocess.run(
            [sys.executable, "-m", "corral.runtime.cli", "ps", "--target", target,
             "--token", TOKEN, "--tls-ca", str(pki / "ca.pem"),
             "--tls-client-cert", str(pki / "client.pem"),
             "--tls-client-key", str(pki / "client.key"), "--json"],
            capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        half = subprocess.run(
            [sys.executable, "-m", "corral.runtime.cli", "ps", "--target", target,
             "--token", TOKEN, "--tls-ca", str(pki / "ca.pem"),
             "--tls-client-cert", str(pki / "client.pem")],
            capture_output=True, text=True, timeout=60)
        assert half.returncode != 0
        assert "--tls-client-cert and --tls-client-key go together" in half.stderr
    finally:
        assert d.stop() == 0, d.log()
    assert d.leftovers() == {}


def _list_request():
    from corral.v1 import sandbox_pb2

    return sandbox_pb2.ListSandboxesRequest()
