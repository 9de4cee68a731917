"""The pure parts of secrets: the stream rewriter, the secret set, its CA and trust, the spec.

The rewriter is fed every case whole, then cut at every byte, then with trailing data
(the h11 way): the outcome may not depend on where a stream was cut.
"""

from __future__ import annotations

import os
import ssl

import pytest
from cryptography import x509

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.secrets import (
    PLACEHOLDER_PREFIX,
    Exfiltration,
    SecretSet,
    StreamRewriter,
    replace_trust_ca,
    write_trust_dir,
)
from corral.sandbox.spec import SandboxSpec, SecretBinding

NEEDLE, VALUE, OTHER = b"corral_secret_aaaa", b"real-value-0001", b"corral_secret_bbbb"


def feed_cut(rewriter: StreamRewriter, data: bytes, cut: int) -> bytes:
    return rewriter.feed(data[:cut]) + rewriter.feed(data[cut:]) + rewriter.finish()


CASES = [
    b"",
    NEEDLE,
    b"x" + NEEDLE + b"y",
    NEEDLE + NEEDLE,
    b"corral_secret_aaa" + b"a" + NEEDLE[:-1],  # a partial needle at the end stays text
    b"Authorization: Bearer " + NEEDLE + b"\r\n",
]


@pytest.mark.parametrize("data", CASES)
def test_replacement_is_the_same_wherever_the_stream_is_cut(data):
    whole = StreamRewriter({NEEDLE: VALUE}, {}).whole(data)
    assert whole == data.replace(NEEDLE, VALUE)
    for cut in range(len(data) + 1):
        assert feed_cut(StreamRewriter({NEEDLE: VALUE}, {}), data, cut) == whole
    bytewise = StreamRewriter({NEEDLE: VALUE}, {})
    out = b"".join(bytewise.feed(data[i:i + 1]) for i in range(len(data)))
    assert out + bytewise.feed(b"tail") + bytewise.finish() == whole + b"tail"


@pytest.mark.parametrize("cut", range(len(b"GET /" + OTHER)))
def test_a_forbidden_needle_is_refused_before_any_byte_of_it_goes_out(cut):
    data = b"GET /" + OTHER.upper() + b" HTTP/1.1"  # any case
    rewriter = StreamRewriter({NEEDLE: VALUE}, {OTHER: "OTHER"})
    sent = rewriter.feed(data[:cut])
    with pytest.raises(Exfiltration) as caught:
        sent += rewriter.feed(data[cut:])
    assert caught.value.secret == "OTHER"
    assert not sent or b"GET /".startswith(sent)  # never past the needle's first byte


def make_set(**values) -> SecretSet:
    return SecretSet([SecretBinding("A", ("api.test",)), SecretBinding("B", ("*.b.test",))],
                     values or {"A": "value-of-a-000", "B": "value-of-b-000"})


def test_placeholders_are_random_prefixed_and_fit_a_dns_label():
    one, two = make_set(), make_set()
    for a, b in zip(one.secrets, two.secrets, strict=True):
        assert a.placeholder != b.placeholder
        assert a.placeholder.decode().startswith(PLACEHOLDER_PREFIX)
        assert len(a.placeholder) == 46 and a.placeholder == a.placeholder.lower()
    assert "value-of" not in repr(one) + repr(one.secrets)


def test_rewriters_per_host():
    secrets = make_set()
    a, b = secrets.secrets
    assert secrets.request_rewriter("api.test").whole(b"k=" + a.placeholder) == \
        b"k=value-of-a-000"
    with pytest.raises(Exfiltration):
        secrets.request_rewriter("api.test").whole(b.placeholder)
    assert secrets.request_rewriter("x.b.test").whole(b.placeholder) == b"value-of-b-000"
    assert secrets.response_scrubber("api.test").whole(b"echo value-of-a-000") == \
        b"echo " + a.placeholder
    with pytest.raises(Exfiltration):
        secrets.outbound().whole(b"..." + a.placeholder)
    assert secrets.foreign_scanner("api.test").whole(a.placeholder) == a.placeholder
    assert secrets.placeholder_in_name(a.placeholder.decode()[:9] + "." +
                                       a.placeholder.decode()[9:] + ".evil.test") == "A"
    assert secrets.intercepts("api.test") and secrets.intercepts("deep.x.b.test")
    assert not secrets.intercepts("b.test") and not secrets.intercepts("api.test.evil")
    assert secrets.redact("got value-of-a-000") == "got [secret A]"


@pytest.mark.parametrize("values, message", [
    ({"A": "value-of-a-000"}, r"^secrets: B has no value \(set it in the caller's "),
    ({"A": "short", "B": "value-of-b-000"}, r"^secrets: A: a value must be at least 8 bytes"),
    ({"A": "value\nof-a-000", "B": "value-of-b-000"}, r"without NUL or line breaks$"),
])
def test_missing_or_unusable_values_are_refused(values, message):
    with pytest.raises(InvalidSpec, match=message):
        make_set(**values)


def test_the_ca_is_name_constrained_and_its_leaves_verify():
    secrets = make_set()
    ca = x509.load_pem_x509_certificate(secrets.ca.cert_pem)
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    assert sorted(n.value for n in constraints.permitted_subtrees) == ["api.test", "b.test"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_ctx = secrets.ca.server_context("api.test")
    assert secrets.ca.server_context("api.test") is server_ctx  # cached
    client_ctx = ssl.create_default_context(cadata=secrets.ca.cert_pem.decode())
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(client_in, client_out, server_hostname="api.test")
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(4):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    assert client.getpeercert()["subject"] == ((("commonName", "api.test"),),)


def test_the_trust_dir_holds_the_system_bundle_plus_the_ca(tmp_path):
    system = tmp_path / "system"
    system.mkdir()
    (system / "ca-certificates.crt").write_bytes(b"SYSTEM BUNDLE")
    (system / "local.pem").write_bytes(b"LOCAL")
    os.symlink(str(system / "local.pem"), system / "abcd1234.0")
    (system / "java").mkdir()
    links = tmp_path / "links"
    (links / "trust-links-4194305").mkdir(parents=True)  # of a pid that cannot exist
    write_trust_dir(str(tmp_path / "trust"), b"CA PEM\n", str(system), str(links))
    trust = tmp_path / "trust"
    assert os.listdir(links) == [f"trust-links-{os.getpid()}"]  # the stale one is gone
    assert os.readlink(trust / "abcd1234.0") == str(system / "local.pem")
    assert os.lstat(trust / "abcd1234.0").st_nlink == 2  # hard-linked from the template
    assert (trust / "ca-certificates.crt").read_bytes() == b"SYSTEM BUNDLE\nCA PEM\n"
    assert (trust / "corral-sandbox-ca.crt").read_bytes() == b"CA PEM\n"
    assert (trust / "local.pem").read_bytes() == b"LOCAL"  # lives in system: copied
    assert not (trust / "java").exists()
    assert oct(os.stat(trust).st_mode & 0o777) == "0o755"


def test_replacing_the_ca_leaves_what_a_new_trust_dir_holds(tmp_path):
    """A warm pool's sandbox is born with a CA of its own; acquire puts the request's in
    (replace_trust_ca): afterwards the directory is what write_trust_dir of that CA makes."""
    system = tmp_path / "system"
    system.mkdir()
    (system / "ca-certificates.crt").write_bytes(b"SYSTEM BUNDLE")  # no final newline
    (system / "local.pem").write_bytes(b"LOCAL")
    born, cold = tmp_path / "born", tmp_path / "cold"
    write_trust_dir(str(born), b"BIRTH CA\n", str(system))
    inode = os.stat(born / "ca-certificates.crt").st_ino
    replace_trust_ca(str(born), b"REQUEST CA\n", str(system))
    write_trust_dir(str(cold), b"REQUEST CA\n", str(system))
    assert sorted(os.listdir(born)) == sorted(os.listdir(cold))  # no staged file left
    for name in os.listdir(cold):
        assert (born / name).read_bytes() == (cold / name).read_bytes(), name
    assert b"BIRTH CA" not in (born / "ca-certificates.crt").read_bytes()
    assert os.stat(born / "ca-certificates.crt").st_ino != inode  # renamed over, whole
    assert oct(os.stat(born / "corral-sandbox-ca.crt").st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("secrets, message", [
    (["TOKEN"], r"^secrets: 'TOKEN' is not NAME@HOST\[,HOST\.\.\.\]$"),
    (["1X@a.test"], r"^secrets: '1X' is not a variable name of at most 128 characters$"),
    (["X" * 129 + "@a.test"], r"is not a variable name of at most 128 characters$"),
    (["A@a b"], r"^secrets: A: 'a b' is not HOST or \*\.DOMAIN$"),
    (["A@*.*.test"], r"^secrets: A: '\*\.\*\.test' is not HOST or \*\.DOMAIN$"),
    (["A@a.test", "A@b.test"], r"^secrets: A is bound twice; give all its hosts in one "),
])
def test_spec_refuses_bad_bindings(secrets, message):
    with pytest.raises(InvalidSpec, match=message):
        SandboxSpec.build(secrets=secrets)


def test_spec_secrets_imply_allow_net_and_round_trip():
    spec = SandboxSpec.build(secrets=["TOKEN@API.test,*.x.test"], allow_net=["other.test"])
    assert spec.secrets == (SecretBinding("TOKEN", ("*.x.test", "api.test")),)
    assert spec.allow_net == ("*.x.test:443", "*.x.test:80", "api.test:443", "api.test:80",
                              "other.test")
    assert SandboxSpec.from_fields(spec.to_fields()) == spec
    with pytest.raises(InvalidSpec, match=r"^secrets: A is also set in env; the secret's "
                                          r"placeholder is that variable$"):
        SandboxSpec.build(secrets=["A@a.test"], env={"A": "1"})
    with pytest.raises(InvalidSpec, match=r"^secrets: only the native backend has the egress"):
        SandboxSpec.build(secrets=["A@a.test"], backend="docker")
