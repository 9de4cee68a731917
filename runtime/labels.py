"""Labels, label selectors and list pages: how clients find their sandboxes and sessions.

Rules this module keeps (docs/architecture.md, "Finding things"):

* A label key is an optional prefix and a name, as Kubernetes has them: `name` or
  `prefix/name`; the name is 1-63 of [A-Za-z0-9._-], starting and ending with [A-Za-z0-9];
  the prefix is a DNS subdomain of at most 253 characters. A value is empty or follows the
  name's rule. At most MAX_LABELS labels per object. A bad one is INVALID_ARGUMENT naming
  `labels.KEY`.
* A selector is requirements joined by commas, all of which must hold:
  `k=v` (or `k==v`): the label k is v; `k!=v`: k is not v (or is absent); `k`: k is
  present; `!k`: k is absent. Spaces around the parts are ignored; an empty selector
  matches everything.
* A page token is opaque to clients: it names the last object of the page before and the
  query it belongs to. The same token with another selector or state is INVALID_ARGUMENT.
  Objects are listed in the order the daemon made them, so a page never repeats an object
  or skips one that existed for the whole listing.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import string
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from corral.sandbox.errors import InvalidSpec

MAX_LABELS = 64
MAX_NAME_CHARS = 63
MAX_PREFIX_CHARS = 253
MAX_SELECTOR_CHARS = 4096
#: List calls: page_size 0 means DEFAULT_PAGE_SIZE; more than MAX_PAGE_SIZE is refused.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_PREFIX_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]{1,80}$")
#: What a quoted key may show as itself inside `["..."]`; every other character is escaped.
_QUOTABLE = frozenset(string.ascii_letters + string.digits + " ._/-+=@,;!?()")


def _shown(text: str) -> str:
    """A key as an error message names it: cut, so that a huge key stays a short message."""
    return text if len(text) <= 80 else text[:80] + "..."


def key_path(field: str, key: str) -> str:
    """The field path of a label key in an error message: `labels.team` for a key written
    with the characters keys may have, else `labels["..."]` with every other character (a
    quote, a colon, a bracket, a newline) escaped as \\xNN or \\uNNNN, so that
    no key can put text into the `field.path: problem` shape of the message."""
    if _PLAIN_KEY_RE.match(key):
        return f"{field}.{key}"
    cut, more = (key[:80], "...") if len(key) > 80 else (key, "")
    quoted = "".join(c if c in _QUOTABLE else
                     (f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                      f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
                     for c in cut)
    return f'{field}["{quoted}{more}"]'


def key_problem(key: str) -> str | None:
    """Why key is not a label key; None when it is one."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "the prefix before '/' is empty"
    if prefix and (len(prefix) > MAX_PREFIX_CHARS or not _PREFIX_RE.match(prefix)):
        return (f"the prefix {_shown(prefix)!r} is not a DNS subdomain (lower-case "
                f"a-z, 0-9, '-' and '.', at most {MAX_PREFIX_CHARS} characters)")
    if not _NAME_RE.match(name):
        return (f"the name {_shown(name)!r} must be 1-{MAX_NAME_CHARS} characters of a-z, A-Z, "
                "0-9, '.', '_', '-', starting and ending with a letter or digit")
    return None


def value_problem(value: str) -> str | None:
    if value and not _NAME_RE.match(value):
        return (f"the value {_shown(value)!r} must be empty or 1-{MAX_NAME_CHARS} characters "
                "of a-z, A-Z, 0-9, '.', '_', '-', starting and ending with a letter or digit")
    return None


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """The labels, checked.

    Raises:
        InvalidSpec: naming `labels.KEY` (or `labels` for too many).
    """
    if len(labels) > MAX_LABELS:
        raise InvalidSpec(field, f"{len(labels)} labels is over the limit of {MAX_LABELS}")
    for key in sorted(labels):
        problem = key_problem(key) or value_problem(labels[key])
        if problem:
            raise InvalidSpec(key_path(field, key), problem)
    return dict(labels)


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.op == "=":
            return labels.get(self.key) == self.value
        if self.op == "!=":
            return labels.get(self.key) != self.value
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class Selector:
    """A parsed label selector: every requirement must hold."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str, field: str = "selector") -> Selector:
        """Parse `k=v,k2!=v2,k3,!k4`.

        Raises:
            InvalidSpec: naming field, the requirement and what is wrong with it.
        """
        if len(text) > MAX_SELECTOR_CHARS:
            raise InvalidSpec(field, f"{len(text)} characters is over the limit of "
                                     f"{MAX_SELECTOR_CHARS}")
        if not text.strip():
            return cls()
        reqs = []
        for i, part in enumerate(text.split(",")):
            part = part.strip()
            if "!=" in part:
                key, _, value = part.partition("!=")
                op = "!="
            elif "=" in part:
                key, _, value = part.partition("=")
                value = value[1:] if value.startswith("=") else value
                op = "="
            elif part.startswith("!"):
                key, value, op = part[1:], "", "!exists"
            else:
                key, value, op = part, "", "exists"
            key, value = key.strip(), value.strip()
            problem = (("empty requirement (two commas, or a comma at an end)"
                        if not part else None)
                       or key_problem(key) or value_problem(value))
            if problem:
                raise InvalidSpec(field, f"requirement {i + 1} ({_shown(part)!r}): {problem}; "
                                         "the grammar is k=v, k!=v, k (present), !k (absent), "
                                         "joined by commas")
            reqs.append(Requirement(key, op, value))
        return cls(tuple(reqs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.holds(labels) for r in self.requirements)


#: The selector that matches everything (an empty one).
EVERYTHING = Selector()


def check_page_size(page_size: int, field: str = "page_size") -> int:
    """The number of objects a page holds: DEFAULT_PAGE_SIZE for 0.

    Raises:
        InvalidSpec: over MAX_PAGE_SIZE (never quietly cut).
    """
    if page_size > MAX_PAGE_SIZE:
        raise InvalidSpec(field, f"{page_size} is over the maximum of {MAX_PAGE_SIZE}")
    return page_size or DEFAULT_PAGE_SIZE


def check_state(state: int, known: Container[int], name: str) -> int:
    """A List request's state filter, unchanged: 0 (any) or a value of `known`.

    Raises:
        InvalidSpec: any other number, named as "N is not a <name>".
    """
    if state and state not in known:
        raise InvalidSpec("state", f"{state} is not a {name}")
    return state


def _query_digest(kind: str, query: str) -> str:
    return hashlib.sha256(f"{kind}\0{query}".encode()).hexdigest()[:12]


def page_token(kind: str, query: str, last_seq: int) -> str:
    """The token of the page after the object numbered last_seq."""
    raw = f"{kind}:{_query_digest(kind, query)}:{last_seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_page_token(token: str, kind: str, query: str, field: str = "page_token") -> int:
    """The seq after which the page the token names starts; 0 for the first page.

    Raises:
        InvalidSpec: not a token of this list, or of this list with another query.
    """
    if not token:
        return 0
    try:
        if len(token) > 128:
            raise ValueError
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        got_kind, digest, seq = raw.split(":")
        after = int(seq)
        if got_kind != kind or after < 0:
            raise ValueError
    except ValueError:
        raise InvalidSpec(field, "not a page token of this list; pass the next_page_token "
                                 "of the page before, or nothing for the first page") from None
    if digest != _query_digest(kind, query):
        raise InvalidSpec(field, "this token belongs to a listing with another selector or "
                                 "state; list again from the first page")
    return after


def page(items: Iterable, after: int, size: int, seq_of) -> tuple[list, int | None]:
    """One page: the first `size` items with seq > after, in seq order, and the seq to
    continue after (None when nothing follows)."""
    return page_in_order(sorted((x for x in items if seq_of(x) > after), key=seq_of),
                         after, size, seq_of)


def page_in_order(items: Iterable, after: int, size: int, seq_of) -> tuple[list, int | None]:
    """page() of items already in seq order, read only up to one past the page: a page
    of a long listing costs its size, not the listing's."""
    chosen = list(itertools.islice((x for x in items if seq_of(x) > after), size + 1))
    more = len(chosen) > size
    del chosen[size:]
    return chosen, (seq_of(chosen[-1]) if more else None)


@dataclass(frozen=True)
class ListQuery:
    """A List request's selector, page size and position, checked; `page()` answers it.

    The page token is bound to the query (`kind` and the request's filters): a token of
    another listing is INVALID_ARGUMENT, never a silently different page.
    """

    selector: Selector
    size: int
    after: int
    kind: str
    query: str

    @classmethod
    def of(cls, request, kind: str, *filters) -> ListQuery:
        """From a request with selector, page_size and page_token fields.

        Raises:
            InvalidSpec: a malformed selector, a page size over the maximum, a bad token.
        """
        selector = Selector.parse(request.selector)
        size = check_page_size(request.page_size)
        query = "\0".join(str(f) for f in (request.selector, *filters))
        return cls(selector, size, parse_page_token(request.page_token, kind, query), kind,
                   query)

    def page(self, items: Iterable, seq_of, *, in_order: bool = False) -> tuple[list, str]:
        """This page of items (in seq order) and the token of the next ("" at the end).

        Args:
            in_order: items already come in seq order (read lazily, see page_in_order).
        """
        chosen, last = (page_in_order if in_order else page)(items, self.after, self.size,
                                                             seq_of)
        return chosen, (page_token(self.kind, self.query, last) if last is not None else "")
