"""What a client asks for is honoured or refused, never quietly changed (issue 17).

Refusals are INVALID_ARGUMENT (or, for a tenant policy's limit, PERMISSION_DENIED) with a
message naming the field and the limit.
"""

from __future__ import annotations

import os

import grpc
import pytest

from corral.runtime.client import ClientError

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _refusal(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code, str(exc.value).split(": ", 1)[1]


def test_a_ttl_over_the_daemons_maximum_is_refused_not_cut(client):
    assert _refusal(lambda: client.create_sandbox(ttl_s=7 * 86400)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "spec.ttl_s: 604800 is over the daemon's maximum of 3600 (sandbox_ttl)")
    sb = client.create_sandbox(ttl_s=120)
    try:
        assert sb.spec.ttl_s == 120
        assert round(sb.expires_at - sb.created_at) == 120
    finally:
        client.destroy_sandbox(sb.id)


def test_cpus_beyond_the_host_and_a_tiny_tmp_are_refused(client):
    cores = os.cpu_count()
    # the host's cores are the operator's policy limit (docs/policy.md): PERMISSION_DENIED
    assert _refusal(lambda: client.create_sandbox(cpus=1000)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        f"spec.cpus: 1000 is over this tenant's limit of {cores}")
    assert _refusal(lambda: client.create_sandbox(tmp_bytes=1)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "spec.tmp_bytes: 1 is under the minimum of 1048576 (1 MiB)")
    sb = client.create_sandbox(tmp_bytes=1 << 20)
    client.destroy_sandbox(sb.id)


def test_read_file_over_4_mib_is_refused_and_truncation_is_flagged(client, sandbox):
    client.write_file(sandbox.id, "big", b"x" * (5 << 20))
    assert _refusal(lambda: client.read_file(sandbox.id, "big", max_bytes=8 << 20)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_bytes: 8388608 is over the maximum of 4194304 bytes (4 MiB) one ReadFile returns")
    whole = client.read_file(sandbox.id, "big", max_bytes=0)
    assert (len(whole), whole.truncated) == (4 << 20, True)
    small = client.read_file(sandbox.id, "big", max_bytes=10)
    assert (small, small.truncated) == (b"x" * 10, True)
    client.write_file(sandbox.id, "small", b"abc")
    exact = client.read_file(sandbox.id, "small")
    assert (exact, exact.truncated) == (b"abc", False)
