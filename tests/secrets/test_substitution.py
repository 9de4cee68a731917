"""A secret's placeholder becomes its value toward its bound host, from real clients.

Each test runs a real client inside a sandbox (curl, Python's urllib and http.client,
Node's https when the host has node) against the tests' TLS server, and checks what the
server received (the value) and what the client got back (the placeholder, scrubbed).
"""

from __future__ import annotations

import json

import pytest

from corral.sandbox import Sandbox
from corral.sandbox.spec import SandboxSpec, SecretBinding

from .conftest import SECRET_VALUE, events_when

MiB = 1 << 20


def secret_sandbox(**kw):
    events: list[dict] = []
    spec = SandboxSpec(secrets=(SecretBinding("API_TOKEN", ("api.test",)),),
                       allow_net=kw.pop("allow_net", ("other.test",)),
                       memory_bytes=256 * MiB, timeout_s=60, **kw)
    sb = Sandbox(spec, on_net_event=events.append, secrets={"API_TOKEN": SECRET_VALUE})
    sb.start()
    return sb, events


def run(sb, argv) -> tuple[int, str, str]:
    proc = sb.exec(argv)
    out, err = proc.communicate()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.fixture
def sandbox(servers):
    sb, events = secret_sandbox()
    try:
        yield sb, events
    finally:
        sb.destroy()


def placeholder(sb) -> str:
    return sb.secrets.secrets[0].placeholder.decode()


def test_the_sandbox_holds_a_placeholder_unique_to_it(servers):
    first, _ = secret_sandbox()
    second, _ = secret_sandbox()
    try:
        seen = [run(sb, ["sh", "-c", "printf %s \"$API_TOKEN\""])[1] for sb in (first, second)]
    finally:
        first.destroy()
        second.destroy()
    assert seen[0].startswith("corral_secret_") and len(seen[0]) == 46
    assert seen[1].startswith("corral_secret_") and seen[0] != seen[1]
    assert SECRET_VALUE not in seen[0] + seen[1]


def test_curl_header_reaches_the_server_with_the_value_and_comes_back_scrubbed(sandbox,
                                                                              servers):
    sb, events = sandbox
    servers.received.clear()
    code, out, err = run(sb, ["sh", "-c", 'curl -sS -D - -H "Authorization: Bearer '
                                          '$API_TOKEN" "https://api.test/v1?key=$API_TOKEN"'])
    assert code == 0, err
    received = servers.all_received()
    assert received.count(SECRET_VALUE.encode()) == 2  # the header and the query
    assert placeholder(sb).encode() not in received
    assert f"\r\nx-echo-auth: Bearer {placeholder(sb)}\r\n" in out
    body = json.loads(out.rsplit("\r\n\r\n", 1)[1])
    assert body["request"] == f"GET /v1?key={placeholder(sb)} HTTP/1.1"
    assert SECRET_VALUE not in out
    intercepted = events_when(events, lambda e: e.get("intercepted"))
    assert intercepted and intercepted[0]["substituted"] == 2


def test_python_urllib_and_http_client_post_bodies(sandbox, servers):
    sb, _ = sandbox
    servers.received.clear()
    code, out, err = run(sb, ["python3", "-I", "-c", """
import http.client, json, os, ssl, urllib.request
token = os.environ['API_TOKEN']
req = urllib.request.Request('https://api.test/form', data=('token=' + token).encode(),
                             headers={'X-Api-Key': token})
with urllib.request.urlopen(req, timeout=20) as r:
    first = json.loads(r.read())
c = http.client.HTTPSConnection('api.test', 443, context=ssl.create_default_context(),
                                timeout=20)
c.request('PUT', '/json', body=json.dumps({'key': token}), headers={'Content-Type': 'x'})
second = json.loads(c.getresponse().read())
print(json.dumps([first, second]))
"""])
    assert code == 0, err
    first, second = json.loads(out)
    token = placeholder(sb)
    assert first["body"] == f"token={token}" and first["headers"]["x-api-key"] == token
    assert second["body"] == json.dumps({"key": token})
    received = servers.all_received()
    assert received.count(SECRET_VALUE.encode()) == 3
    assert token.encode() not in received


def test_node_https_trusts_the_sandbox_ca(sandbox, servers):
    sb, _ = sandbox
    servers.received.clear()
    code, out, err = run(sb, ["node", "-e", """
const https = require('https');
https.get('https://api.test/node', {headers: {authorization: 'Bearer ' +
    process.env.API_TOKEN}}, (res) => {
  let body = ''; res.on('data', (d) => body += d);
  res.on('end', () => console.log(res.headers['x-echo-auth']));
}).on('error', (e) => { console.error(e.message); process.exit(3); });
"""])
    assert code == 0, err
    assert out.strip() == f"Bearer {placeholder(sb)}"
    assert f"authorization: Bearer {SECRET_VALUE}".encode() in servers.all_received()


def test_the_sandbox_trusts_its_ca_read_only_and_holds_no_key(sandbox):
    sb, _ = sandbox
    code, out, err = run(sb, ["sh", "-c", "cat /etc/ssl/certs/corral-sandbox-ca.crt; "
                                          "tail -c 2000 /etc/ssl/certs/ca-certificates.crt; "
                                          "echo x >> /etc/ssl/certs/ca-certificates.crt; "
                                          "echo $? $SSL_CERT_FILE $NODE_EXTRA_CA_CERTS"])
    assert code == 0, err
    ca = sb.secrets.ca.cert_pem.decode()
    assert out.startswith(ca) and out.count(ca) == 2  # alone, and last in the bundle
    assert "PRIVATE KEY" not in out
    assert out.rstrip().endswith("2 /etc/ssl/certs/ca-certificates.crt "
                                 "/etc/ssl/certs/corral-sandbox-ca.crt")
    assert err == "sh: 1: cannot create /etc/ssl/certs/ca-certificates.crt: Permission denied\n"


def test_bodies_chunked_and_long(sandbox, servers):
    """A chunked body is rewritten across its chunks (and its 2 MiB echo scrubbed back as
    it streams); a fixed-length body over the 1 MiB bound goes unchanged."""
    sb, _ = sandbox
    servers.received.clear()
    code, out, err = run(sb, ["python3", "-I", "-c", """
import http.client, json, os
token = os.environ['API_TOKEN'].encode()
c = http.client.HTTPSConnection('api.test', 443, timeout=30)
chunks = [b'x' * (2 << 20), b'k=' + token[:20], token[20:]]
c.request('POST', '/chunked', body=iter(chunks), encode_chunked=True)
r = c.getresponse()
echo = r.read()
first = [r.getheader('Transfer-Encoding'), json.loads(echo)['body'][-200:]]
c = http.client.HTTPSConnection('api.test', 443, timeout=30)
c.request('POST', '/long', body=b'y' * (1 << 20) + b'k=' + token)
second = json.loads(c.getresponse().read())['body'][-60:]
print(json.dumps([first, second]))
"""])
    assert code == 0, err
    (encoding, chunked_tail), long_tail = json.loads(out)
    token = placeholder(sb)
    assert encoding == "chunked"  # re-framed: the scrubbed body is shorter
    assert token in chunked_tail and SECRET_VALUE not in chunked_tail  # the raw chunks
    assert long_tail.endswith("k=" + token)
    chunked, long = [data for _, data in servers.received]
    assert chunked.count(SECRET_VALUE.encode()) == 1 and token.encode() not in chunked
    assert SECRET_VALUE.encode() not in long and long.endswith(b"k=" + token.encode())
