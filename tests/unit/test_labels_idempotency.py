"""runtime/labels.py (label rules, selectors, page tokens) and runtime/idempotency.py."""

from __future__ import annotations

import asyncio
import re

import pytest

from corral.runtime.idempotency import RequestLedger
from corral.runtime.labels import (
    MAX_LABELS,
    Selector,
    check_labels,
    check_page_size,
    page,
    page_token,
    parse_page_token,
)
from corral.runtime.tasks.model import RequestIdReused
from corral.sandbox.errors import InvalidSpec

#: `field.path: problem`, as tests/unit/test_error_shape.py reads it.
SHAPE = re.compile(r"^-{0,2}[A-Za-z_][\w-]*(\.[\w/-]+|\[[^\]]*\])*: \S")


@pytest.mark.parametrize("key", ["a", "A9", "app.kubernetes.io/name", "x_y-z.w",
                                 "a" * 63, ("d" * 63 + ".") * 3 + "d" * 61 + "/n"])
def test_good_keys(key):
    assert check_labels({key: "v"}) == {key: "v"}


@pytest.mark.parametrize("key,path,problem", [
    ("", 'labels[""]', "the name '' must be"),
    ("-a", "labels.-a", "the name '-a' must be"),
    ("a" * 64, "labels." + "a" * 64, "the name 'aaaa"),
    ("/a", "labels./a", "the prefix before '/' is empty"),
    ("Upper.case/a", "labels.Upper.case/a", "the prefix 'Upper.case' is not a DNS subdomain"),
    ("a/b/c", "labels.a/b/c", "the prefix 'a/b' is not a DNS subdomain"),
    ("a b", 'labels["a b"]', "the name 'a b' must be"),
])
def test_bad_keys_name_the_label(key, path, problem):
    with pytest.raises(InvalidSpec, match="^" + re.escape(f"{path}: {problem}")):
        check_labels({key: ""})


@pytest.mark.parametrize("key,path", [
    ("a: forged problem\nlabels.ok", r'labels["a\x3a forged problem\x0alabels.ok"]'),
    ('x"]: y', r'labels["x\x22\x5d\x3a y"]'),
    ("back\\slash", r'labels["back\x5cslash"]'),
    ("t\u00e9\U0001f600", r'labels["t\xe9\U0001f600"]'),
])
def test_a_hostile_key_cannot_write_into_the_field_path(key, path):
    """A key is put in its field path quoted, with quotes, colons, brackets, backslashes,
    line breaks and non-ASCII escaped: the message still reads `field.path: problem`, with
    the whole path before the first ': ', and one line."""
    with pytest.raises(InvalidSpec) as caught:
        check_labels({key: "v"})
    message = str(caught.value)
    assert caught.value.field == path
    assert message.partition(": ")[0] == path
    assert "\n" not in message
    assert SHAPE.match(message)


def test_values_and_counts():
    assert check_labels({"k": ""}) == {"k": ""}
    with pytest.raises(InvalidSpec, match=r"^start\.labels\.k: the value 'a b' must be"):
        check_labels({"k": "a b"}, "start.labels")
    with pytest.raises(InvalidSpec, match=r"^labels: 65 labels is over the limit of 64$"):
        check_labels({f"k{i}": "" for i in range(MAX_LABELS + 1)})


def test_a_huge_key_gives_a_short_message():
    with pytest.raises(InvalidSpec) as exc:
        check_labels({"x" * 100_000: ""})
    assert len(str(exc.value)) < 400


LABELS = {"team": "ml", "gpu": ""}


@pytest.mark.parametrize("text,matches", [
    ("", True), ("team=ml", True), ("team==ml", True), ("team!=ml", False),
    ("team=web", False), ("team!=web", True), ("gpu", True), ("!gpu", False),
    ("env", False), ("!env", True), ("env!=prod", True), ("gpu=", True),
    (" team = ml ,gpu ", True), ("team=ml,env", False),
])
def test_selector_matches(text, matches):
    assert Selector.parse(text).matches(LABELS) is matches


@pytest.mark.parametrize("text,where", [
    ("a,,b", "requirement 2 (''): empty requirement"),
    (",", "requirement 1 (''): empty requirement"),
    ("=v", "requirement 1 ('=v'): the name ''"),
    ("a=b=c", "requirement 1 ('a=b=c'): the value 'b=c'"),
    ("a!=b c", "requirement 1 ('a!=b c'): the value 'b c'"),
    ("!", "requirement 1 ('!'): the name ''"),
])
def test_bad_selectors(text, where):
    with pytest.raises(InvalidSpec, match=r"^selector: " + re.escape(where)):
        Selector.parse(text)


def test_page_tokens_round_trip_and_refuse_others():
    token = page_token("sandboxes", "q", 42)
    assert parse_page_token(token, "sandboxes", "q") == 42
    assert parse_page_token("", "sandboxes", "q") == 0
    with pytest.raises(InvalidSpec, match=r"^page_token: this token belongs to a listing "):
        parse_page_token(token, "sandboxes", "other")
    for bad in ("x", "!!!", "a" * 200, page_token("sessions", "q", 1), "c2FuZGJveGVz"):
        with pytest.raises(InvalidSpec, match=r"^page_token: not a page token of this list"):
            parse_page_token(bad, "sandboxes", "q")


def test_page_size_and_pages():
    assert check_page_size(0) == 100 and check_page_size(1000) == 1000
    with pytest.raises(InvalidSpec, match=r"^page_size: 1001 is over the maximum of 1000$"):
        check_page_size(1001)
    items = [5, 1, 3, 2, 4]
    assert page(items, 0, 2, int) == ([1, 2], 2)
    assert page(items, 2, 2, int) == ([3, 4], 4)
    assert page(items, 4, 2, int) == ([5], None)
    assert page(items, 5, 2, int) == ([], None)


# -- the request ledger --------------------------------------------------------------------


def test_one_request_id_makes_one_object_also_when_racing():
    async def main():
        ledger = RequestLedger("sandbox")
        made = []

        async def make():
            await asyncio.sleep(0.01)
            made.append(len(made) + 1)
            return f"obj-{len(made)}"

        results = await asyncio.gather(*(ledger.run("t", "r1", "fp", make) for _ in range(5)))
        assert made == [1]
        assert sorted(results) == [("obj-1", False)] + [("obj-1", True)] * 4
        assert await ledger.run("t", "r1", "fp", make) == ("obj-1", True)
        assert await ledger.run("other", "r1", "fp", make) == ("obj-2", False)  # per tenant
        with pytest.raises(RequestIdReused, match=r"^request_id: 'r1' already made obj-1 for "
                                                  r"a different request; "):
            await ledger.run("t", "r1", "fp2", make)
        with pytest.raises(InvalidSpec, match=r"^request_id: "):
            await ledger.run("t", "has space", "fp", make)

    asyncio.run(main())


def test_a_failed_request_is_forgotten_and_waiters_retry():
    async def main():
        ledger = RequestLedger("session")
        calls = []

        async def make():
            calls.append(1)
            await asyncio.sleep(0.01)
            if len(calls) == 1:
                raise InvalidSpec("spec", "no")
            return "ok"

        first, second = await asyncio.gather(ledger.run("t", "r", "fp", make),
                                             ledger.run("t", "r", "fp", make),
                                             return_exceptions=True)
        assert isinstance(first, InvalidSpec)
        assert second == ("ok", False) and len(calls) == 2

    asyncio.run(main())


def test_the_ledger_is_bounded_per_tenant_and_in_time():
    async def main():
        ledger = RequestLedger("sandbox", max_per_tenant=3, window_s=3600)

        async def make():
            return "x"

        for i in range(10):
            await ledger.run("t", f"r{i}", "fp", make)
        assert len(ledger) == 3
        assert await ledger.run("t", "r9", "fp", make) == ("x", True)
        assert await ledger.run("t", "r0", "fp", make) == ("x", False)  # forgotten: made anew
        short = RequestLedger("sandbox", window_s=0.0)
        await short.run("t", "r", "fp", make)
        await asyncio.sleep(0.01)
        assert await short.run("t", "r", "fp", make) == ("x", False)

    asyncio.run(main())
