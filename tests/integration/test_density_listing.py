"""List at many sandboxes (issue 16's density): the daemon keeps each tenant's sandboxes in
creation order and List reads only its page of them, so this checks that the pages are
still every sandbox once, in creation order, per tenant and per selector, while other
tenants create in between and sandboxes are destroyed mid-listing."""

from __future__ import annotations

import secrets

import pytest

from corral.v1 import sandbox_pb2

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

#: More than two default pages (100), so a page boundary falls inside each selector's run.
MANY = 230
#: Room for them under the tenant quota (32 by default) and the daemon's max_sandboxes.
CONFIG = """
[policy]
max_sandboxes = 300
"""


def _all_pages(client, selector: str = "", page_size: int = 0, state: int = 0):
    """Every page of a listing: the ids of each page, in order."""
    pages, token = [], ""
    while True:
        page = client.list_sandboxes_page(selector, state=state, page_size=page_size,
                                          page_token=token)
        pages.append([sb.id for sb in page.sandboxes])
        token = page.next_page_token
        if not token:
            return pages


def test_pages_keep_creation_order_across_many_sandboxes_and_tenants(make_daemon):
    daemon = make_daemon("many", config=CONFIG).start()
    mine = daemon.client(tenant=f"many-{secrets.token_hex(3)}")
    other = daemon.client(tenant=f"other-{secrets.token_hex(3)}")
    made, others = [], []
    try:
        for i in range(MANY):
            made.append(mine.create_sandbox(labels={"half": "ab"[i % 2]}).id)
            if i % 50 == 0:  # another tenant's creates interleave with ours
                others.append(other.create_sandbox(labels={"half": "a"}).id)

        pages = _all_pages(mine)
        assert [len(p) for p in pages] == [100, 100, 30]
        assert sum(pages, []) == made
        assert sum(_all_pages(mine, "half=a", page_size=40), []) == made[0::2]
        assert sum(_all_pages(mine, "half=b", page_size=115), []) == made[1::2]
        assert sum(_all_pages(other), []) == others

        # destroyed ones leave the index: pages close up, order unchanged
        gone = set(made[95:105]) | {made[0], made[-1]}
        first = mine.list_sandboxes_page(page_size=100)
        for sandbox_id in gone:
            mine.destroy_sandbox(sandbox_id)
        rest = mine.list_sandboxes_page(page_size=100, page_token=first.next_page_token)
        alive = [i for i in made if i not in gone]
        assert [sb.id for sb in rest.sandboxes] == [i for i in made[100:] if i not in gone][:100]
        assert sum(_all_pages(mine), []) == alive
        destroyed = sum(_all_pages(mine, state=sandbox_pb2.SANDBOX_STATE_DESTROYED), [])
        assert destroyed == [i for i in made if i in gone]  # creation order, not destroy order
        made = alive
    finally:
        for client, ids in ((mine, made), (other, others)):
            for sandbox_id in ids:
                client.destroy_sandbox(sandbox_id)
    assert mine.list_sandboxes() == [] and other.list_sandboxes() == []
