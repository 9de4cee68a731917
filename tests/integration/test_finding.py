"""Finding things, idempotency and lifecycle (issue 17): labels and selectors on sandboxes and
sessions, paged List calls, Sessions.Get/List, request_id on Create and session start,
Destroy of a destroyed sandbox, and Sandboxes.SetTimeout.

Each test uses a tenant of its own (x-corral-tenant on the unix socket), so what it lists
is exactly what it made, whatever else the shared daemon runs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2, session_pb2

from .daemon_harness import (
    PLAIN_AGENT,
    DaemonProcess,
    SessionRecorder,
    upload_agents,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def _tenant(daemon, name: str):
    return daemon.client(tenant=f"{name}-{secrets.token_hex(3)}")


def _refused(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code, str(exc.value).split(": ", 1)[1]


def _ids(items) -> set[str]:
    return {getattr(x, "id", None) or x.session_id for x in items}


@pytest.fixture
def destroy_all():
    """Destroys every sandbox a test's clients made (also when the test fails)."""
    clients = []
    yield clients.append
    for c in clients:
        for sb in c.list_sandboxes():
            c.destroy_sandbox(sb.id)


def test_labels_round_trip_and_selectors_choose_exactly(daemon, destroy_all):
    c = _tenant(daemon, "labels")
    destroy_all(c)
    made = {
        "a": c.create_sandbox(labels={"team": "ml", "gpu": "", "example.com/owner": "ann"}),
        "b": c.create_sandbox(labels={"team": "ml"}),
        "c": c.create_sandbox(labels={"team": "web", "env": "prod"}),
        "d": c.create_sandbox(),
    }
    assert dict(made["a"].labels) == {"team": "ml", "gpu": "", "example.com/owner": "ann"}
    assert dict(c.get_sandbox(made["c"].id).labels) == {"team": "web", "env": "prod"}
    ids = {name: sb.id for name, sb in made.items()}

    def chosen(selector: str) -> set[str]:
        return {name for name, i in ids.items() if i in _ids(c.list_sandboxes(selector))}

    assert chosen("") == {"a", "b", "c", "d"}
    assert chosen("team=ml") == {"a", "b"}
    assert chosen("team==ml") == {"a", "b"}
    assert chosen("team!=ml") == {"c", "d"}  # absent counts as "not ml"
    assert chosen("gpu") == {"a"}
    assert chosen("!gpu") == {"b", "c", "d"}
    assert chosen(" team = ml , !gpu ") == {"b"}
    assert chosen("team=ml,env=prod") == set()
    assert chosen("example.com/owner=ann") == {"a"}
    assert chosen("team") == {"a", "b", "c"}

    # another tenant sees none of them, whatever it selects
    other = _tenant(daemon, "labels-other")
    assert other.list_sandboxes() == [] and other.list_sandboxes("team=ml") == []


def test_bad_labels_and_selectors_are_invalid_argument_naming_the_field(daemon):
    c = _tenant(daemon, "badlabels")
    code, msg = _refused(lambda: c.create_sandbox(labels={"bad key": "x"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("labels[\"bad key\"]: the name 'bad key' must be 1-63 characters")
    code, msg = _refused(lambda: c.create_sandbox(labels={"team": "x" * 64}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("labels.team: the value 'xxxx")
    code, msg = _refused(lambda: c.create_sandbox(labels={"Not.A.Dns/x": "1"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("labels.Not.A.Dns/x: the prefix 'Not.A.Dns' is not a DNS subdomain")
    code, msg = _refused(lambda: c.create_sandbox(labels={f"k{i}": "v" for i in range(65)}))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           "labels: 65 labels is over the limit of 64")
    assert c.list_sandboxes() == []  # nothing was made

    code, msg = _refused(lambda: c.list_sandboxes("team=ml,,gpu"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("selector: requirement 2 (''): empty requirement")
    code, msg = _refused(lambda: c.list_sandboxes("=ml"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("selector: requirement 1 ('=ml'): the name ''")
    code, msg = _refused(lambda: c.list_sessions("a=b=c"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("selector: requirement 1 ('a=b=c'): the value 'b=c'")


def test_paging_lists_every_sandbox_once_across_pages(daemon, destroy_all):
    c = _tenant(daemon, "paging")
    destroy_all(c)
    made = [c.create_sandbox(labels={"batch": "p", "n": str(i)}).id for i in range(23)]
    other = c.create_sandbox(labels={"batch": "q"}).id

    seen, token, pages = [], "", 0
    while True:
        page = c.list_sandboxes_page("batch=p", page_size=5, page_token=token)
        pages += 1
        assert len(page.sandboxes) == (5 if page.next_page_token else 4)  # 23 + 1 late
        seen.extend(sb.id for sb in page.sandboxes)
        if pages == 2:  # objects made or destroyed mid-listing do not shift the pages
            c.destroy_sandbox(made[0])
            made.append(c.create_sandbox(labels={"batch": "p", "n": "late"}).id)
        token = page.next_page_token
        if not token:
            break
    assert pages == 5
    assert seen == made  # creation order, no repeats, no gaps
    assert other not in seen
    assert [sb.id for sb in c.list_sandboxes("batch=p")] == made[1:]

    # one page of everything: default size 100
    assert not c.list_sandboxes_page().next_page_token

    # a token of another listing, a forged one, and a page too big are refused
    first = c.list_sandboxes_page("batch=p", page_size=2)
    code, msg = _refused(lambda: c.list_sandboxes_page("batch=q", page_token=first.next_page_token))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           "page_token: this token belongs to a listing with another selector "
                           "or state; list again from the first page")
    code, msg = _refused(lambda: c.list_sandboxes_page(page_token="garbage!"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("page_token: not a page token of this list")
    code, msg = _refused(lambda: c.list_sessions_page(page_token=first.next_page_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("page_token: not a page token of this list")
    code, msg = _refused(lambda: c.list_sandboxes_page(page_size=1001))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           "page_size: 1001 is over the maximum of 1000")


def test_state_filter_and_destroy_of_a_destroyed_sandbox(daemon):
    c = _tenant(daemon, "destroyed")
    sb = c.create_sandbox(labels={"k": "v"})
    live = c.create_sandbox()
    try:
        assert c.destroy_sandbox(sb.id) is False
        assert c.destroy_sandbox(sb.id) is True  # says so, and does not fail
        assert _ids(c.list_sandboxes()) == {live.id}
        assert _ids(c.list_sandboxes(state=sandbox_pb2.SANDBOX_STATE_RUNNING)) == {live.id}
        gone = c.list_sandboxes(state=sandbox_pb2.SANDBOX_STATE_DESTROYED)
        assert [(g.id, g.state, dict(g.labels)) for g in gone] == [
            (sb.id, sandbox_pb2.SANDBOX_STATE_DESTROYED, {"k": "v"})]
        assert c.list_sandboxes("k=v", state=sandbox_pb2.SANDBOX_STATE_DESTROYED)[0].id == sb.id
        # another tenant: NOT_FOUND for the destroyed id too, and none listed
        other = _tenant(daemon, "destroyed-other")
        code, _ = _refused(lambda: other.destroy_sandbox(sb.id))
        assert code == grpc.StatusCode.NOT_FOUND
        assert other.list_sandboxes(state=sandbox_pb2.SANDBOX_STATE_DESTROYED) == []
        code, _ = _refused(lambda: c.destroy_sandbox("sbx-000000000000"))
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        c.destroy_sandbox(live.id)


def test_a_retried_create_makes_one_sandbox(daemon, destroy_all):
    c = _tenant(daemon, "idem")
    destroy_all(c)
    first = c.create_sandbox(request_id="req-1", memory_bytes=128 << 20, labels={"a": "1"})
    again = c.create_sandbox(request_id="req-1", memory_bytes=128 << 20, labels={"a": "1"})
    assert again.id == first.id
    assert _ids(c.list_sandboxes()) == {first.id}
    # the same id with another request is refused, naming what it made
    code, msg = _refused(lambda: c.create_sandbox(request_id="req-1", memory_bytes=256 << 20,
                                                  labels={"a": "1"}))
    assert (code, msg) == (grpc.StatusCode.ALREADY_EXISTS,
                           f"request_id: 'req-1' already made {first.id} for a different "
                           "request; a new request needs a new request_id")
    code, _ = _refused(lambda: c.create_sandbox(request_id="req-1", memory_bytes=128 << 20,
                                                labels={"a": "2"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # per tenant: another tenant's same id makes its own sandbox
    other = _tenant(daemon, "idem-other")
    destroy_all(other)
    theirs = other.create_sandbox(request_id="req-1", memory_bytes=128 << 20, labels={"a": "1"})
    assert theirs.id != first.id
    # a malformed id is refused
    code, msg = _refused(lambda: c.create_sandbox(request_id="has space"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("request_id: ")
    # once destroyed, the retry still returns that sandbox (DESTROYED), never a new one
    c.destroy_sandbox(first.id)
    replay = c.create_sandbox(request_id="req-1", memory_bytes=128 << 20, labels={"a": "1"})
    assert (replay.id, replay.state) == (first.id, sandbox_pb2.SANDBOX_STATE_DESTROYED)
    assert c.list_sandboxes() == []


def test_concurrent_creates_with_one_request_id_make_exactly_one_sandbox(daemon, destroy_all):
    c = _tenant(daemon, "race")
    destroy_all(c)
    results, errors = [], []
    start = threading.Barrier(6)

    def create() -> None:
        start.wait()
        try:
            results.append(c.create_sandbox(request_id="race-1", labels={"r": "1"}).id)
        except ClientError as exc:  # pragma: no cover - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 6 and len(set(results)) == 1
    assert _ids(c.list_sandboxes()) == set(results)
    creates = [r for r in daemon.records("sandbox.create") if r.sandbox_id == results[0]]
    assert len(creates) == 1


def test_sessions_get_list_labels_and_idempotent_start(daemon, destroy_all):
    c = _tenant(daemon, "sessions")
    destroy_all(c)
    sb = c.create_sandbox()
    upload_agents(c, sb.id)
    argv = ["python3", PLAIN_AGENT, "--echo"]
    first = SessionRecorder(c.open_session(argv, sandbox_id=sb.id, labels={"role": "coder"},
                                           request_id="ses-req-1", input="hello"))
    first.wait_for(lambda r: r.session_id, what="opened")
    sid = first.session_id
    other = SessionRecorder(c.open_session(argv, sandbox_id=sb.id, labels={"role": "review"}))
    other.wait_for(lambda r: r.session_id, what="opened")

    # a retried start attaches to the same session and starts no second agent
    retry = SessionRecorder(c.open_session(argv, sandbox_id=sb.id, labels={"role": "coder"},
                                           request_id="ses-req-1", input="hello"))
    retry.wait_for(lambda r: r.session_id, what="opened")
    assert retry.session_id == sid
    code, msg = _refused(lambda: list(c.open_session(argv, sandbox_id=sb.id,
                                                     labels={"role": "other"},
                                                     request_id="ses-req-1")))
    assert (code, msg) == (grpc.StatusCode.ALREADY_EXISTS,
                           f"request_id: 'ses-req-1' already made {sid} for a different "
                           "request; a new request needs a new request_id")
    opens = [r for r in daemon.records("session.open") if r.sandbox_id == sb.id]
    assert len(opens) == 2

    info = c.get_session(sid)
    assert (info.session_id, info.sandbox_id, info.state, dict(info.labels)) == (
        sid, sb.id, session_pb2.SESSION_STATE_RUNNING, {"role": "coder"})
    assert info.created_at > 0 and not info.owns_sandbox and info.turn == 1
    assert wait_until(lambda: c.get_session(sid).last_seq >= 1)
    assert c.get_session(sid).watchers == 2

    assert [s.session_id for s in c.list_sessions()] == [sid, other.session_id]
    assert [s.session_id for s in c.list_sessions("role=coder")] == [sid]
    assert [s.session_id for s in c.list_sessions("role!=coder")] == [other.session_id]
    page = c.list_sessions_page(page_size=1)
    assert [s.session_id for s in page.sessions] == [sid]
    page = c.list_sessions_page(page_size=1, page_token=page.next_page_token)
    assert [s.session_id for s in page.sessions] == [other.session_id]
    assert page.next_page_token == ""

    # another tenant: NOT_FOUND for Get, nothing listed
    stranger = _tenant(daemon, "sessions-other")
    code, _ = _refused(lambda: stranger.get_session(sid))
    assert code == grpc.StatusCode.NOT_FOUND
    assert stranger.list_sessions() == []
    code, _ = _refused(lambda: c.get_session("ses-000000000000"))
    assert code == grpc.StatusCode.NOT_FOUND

    # state: once the agent has exited the session is EXITED (kept until idle-reaped;
    # a Close would end and remove it)
    first.stream.send_input("quit")
    first.wait_for(lambda r: r.first("exited") is not None, what="exit")
    assert wait_until(lambda: c.get_session(sid).state == session_pb2.SESSION_STATE_EXITED)
    assert [s.session_id for s in c.list_sessions(
        state=session_pb2.SESSION_STATE_EXITED)] == [sid]
    assert [s.session_id for s in c.list_sessions(
        state=session_pb2.SESSION_STATE_RUNNING)] == [other.session_id]
    other.stream.close_session()
    other.wait_for(lambda r: r.first("exited") is not None, what="exit")


def test_openmany_start_with_a_request_id_starts_one_session(daemon, destroy_all):
    c = _tenant(daemon, "mux")
    destroy_all(c)
    mux = c.open_many()
    mux.start("one", ["sleep", "60"], labels={"via": "mux"}, request_id="mux-req",
              memory_bytes=128 << 20)
    mux.start("two", ["sleep", "60"], labels={"via": "mux"}, request_id="mux-req",
              memory_bytes=128 << 20)
    opened = {}
    events = iter(mux)
    for ref, event in events:
        if event.WhichOneof("event") == "opened":
            opened[ref] = event.opened.session_id
        assert event.WhichOneof("event") != "error", event
        if len(opened) == 2:
            break
    assert opened["one"] == opened["two"]
    listed = c.list_sessions("via=mux")
    assert [s.session_id for s in listed] == [opened["one"]]
    assert listed[0].owns_sandbox
    # the sandbox made for the session carries its labels
    assert dict(c.get_sandbox(listed[0].sandbox_id).labels) == {"via": "mux"}
    mux.close_session("one")
    for ref, event in events:
        if event.WhichOneof("event") == "exited" and ref == "two":
            break
    mux.cancel()


# -- SetTimeout ------------------------------------------------------------------------------

TTL_CONFIG = """
sandbox_ttl = "10m"

[policy]
max_ttl = "5m"
"""


@pytest.fixture(scope="module")
def ttl_daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("ttl"), config=TTL_CONFIG).start()
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    assert d.leftovers() == {}


def test_set_timeout_extends_a_sandbox_past_its_old_ttl(ttl_daemon):
    c = ttl_daemon.client()
    sb = c.create_sandbox(ttl_s=3)
    try:
        longer = c.set_timeout(sb.id, 60)
        assert longer.expires_at > sb.expires_at + 50
        assert c.get_sandbox(sb.id).expires_at == longer.expires_at
        time.sleep(max(0.0, sb.expires_at + 2.5 - time.time()))  # past the old TTL + a reap
        assert c.get_sandbox(sb.id).state == sandbox_pb2.SANDBOX_STATE_RUNNING
        record = [r for r in ttl_daemon.records("sandbox.timeout") if r.sandbox_id == sb.id]
        assert len(record) == 1
    finally:
        c.destroy_sandbox(sb.id)


def test_set_timeout_shortens_a_sandbox_and_it_is_reaped(ttl_daemon):
    c = ttl_daemon.client()
    sb = c.create_sandbox(ttl_s=300)
    shorter = c.set_timeout(sb.id, 1)
    assert shorter.expires_at < sb.expires_at
    assert wait_until(lambda: c.list_sandboxes() == [], timeout_s=30)
    gone = c.list_sandboxes(state=sandbox_pb2.SANDBOX_STATE_DESTROYED)
    assert gone[-1].id == sb.id  # the latest destroyed (this module's daemon)
    assert c.destroy_sandbox(sb.id) is True

    def destroys():  # the record follows the kernel teardown, after List stops showing it
        return [json.loads(r.detail_json)["reason"]
                for r in ttl_daemon.records("sandbox.destroy") if r.sandbox_id == sb.id]

    assert wait_until(lambda: destroys() != [], timeout_s=10)
    assert destroys() == ["ttl"]


def test_set_timeout_refusals_are_exact(ttl_daemon):
    c = ttl_daemon.client()  # the operator: no policy max_ttl
    acme = ttl_daemon.client(tenant="acme")  # the tenant default: max_ttl 5m
    sb = c.create_sandbox()
    theirs = acme.create_sandbox()
    try:
        code, msg = _refused(lambda: c.set_timeout(sb.id, 601))
        assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "ttl_s: 601 is over the daemon's maximum of 600 (sandbox_ttl)")
        code, msg = _refused(lambda: c.set_timeout(sb.id, 0))
        assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "ttl_s: must be at least 1 second")
        assert c.set_timeout(sb.id, 600).id == sb.id  # the daemon's maximum itself is fine
        code, msg = _refused(lambda: acme.set_timeout(theirs.id, 301))
        assert (code, msg) == (grpc.StatusCode.PERMISSION_DENIED,
                               "ttl_s: 301 is over this tenant's limit of 300 seconds (max_ttl)")
        assert acme.set_timeout(theirs.id, 300).id == theirs.id
        code, _ = _refused(lambda: acme.set_timeout(sb.id, 10))  # another tenant's
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = _refused(lambda: c.set_timeout("sbx-000000000000", 10))
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        c.destroy_sandbox(sb.id)
        acme.destroy_sandbox(theirs.id)


# -- the CLI ---------------------------------------------------------------------------------


def _corral(daemon, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          capture_output=True, env=env, timeout=60, check=False, text=True)


def test_cli_labels_request_id_selector_timeout_and_destroy_twice(daemon):
    tag = secrets.token_hex(4)
    made = _corral(daemon, "create", "--memory", "64M", "--label", f"cli={tag}",
                   "--label", "tier", "--request-id", f"cli-{tag}")
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.strip()
    try:
        again = _corral(daemon, "create", "--memory", "64M", "--label", f"cli={tag}",
                        "--label", "tier", "--request-id", f"cli-{tag}")
        assert (again.returncode, again.stdout.strip()) == (0, sandbox_id)
        other = _corral(daemon, "create", "--memory", "128M", "--label", f"cli={tag}",
                        "--label", "tier", "--request-id", f"cli-{tag}")
        assert other.returncode == 1 and "ALREADY_EXISTS: request_id:" in other.stderr

        listed = _corral(daemon, "ps", "--selector", f"cli={tag},tier")
        assert listed.returncode == 0, listed.stderr
        rows = listed.stdout.splitlines()
        assert rows[0].endswith("  LABELS") and len(rows) == 2
        assert rows[1].startswith(sandbox_id) and rows[1].endswith(f"  cli={tag},tier")
        none = _corral(daemon, "ps", "--selector", f"cli={tag},!tier")
        assert (none.returncode, none.stdout) == (0, "no sandboxes\n")
        bad = _corral(daemon, "ps", "--selector", "cli==,=")
        assert bad.returncode == 2 and "INVALID_ARGUMENT: selector: requirement 2" in bad.stderr

        extended = _corral(daemon, "timeout", sandbox_id, "45m")
        assert extended.returncode == 0, extended.stderr
        assert extended.stdout.strip() == time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(daemon.client().get_sandbox(sandbox_id).expires_at))
        over = _corral(daemon, "timeout", sandbox_id, "2h")
        assert over.returncode == 2 and "ttl_s: 7200 is over the daemon's maximum" in over.stderr

        sessions = _corral(daemon, "sessions", "--selector", f"cli={tag}")
        assert (sessions.returncode, sessions.stdout) == (0, "no sessions\n")
    finally:
        first = _corral(daemon, "destroy", sandbox_id)
        assert (first.returncode, first.stderr) == (0, "")
    second = _corral(daemon, "destroy", sandbox_id)
    assert (second.returncode, second.stderr) == (
        0, f"corral: destroy: {sandbox_id} was already destroyed\n")
