"""Labels on deep tasks (issue 17, "Finding things"): stored with the spec, so they survive
a restart; Tasks.List filters by label selector and pages newest first with tokens."""

from __future__ import annotations

import pytest

from corral.runtime.client import ClientError

from .helpers import SUCCEEDED, wait_done


def test_task_labels_selectors_pages_and_restart(task_daemon):
    d = task_daemon()
    c = d.client()
    ml = [c.submit_task(["true"], labels={"team": "ml", "run": str(i)}).id for i in range(5)]
    web = c.submit_task(["true"], labels={"team": "web"}).id
    bare = c.submit_task(["true"]).id
    assert dict(c.get_task(ml[0]).spec.labels) == {"team": "ml", "run": "0"}

    assert [t.id for t in c.list_tasks(selector="team=ml")] == ml[::-1]  # newest first
    assert [t.id for t in c.list_tasks(selector="team!=ml")] == [bare, web]
    assert [t.id for t in c.list_tasks(selector="!team")] == [bare]
    assert [t.id for t in c.list_tasks(selector="team=ml,run=3")] == [ml[3]]

    # pages of 2, newest first: every task once, none skipped
    seen, token = [], ""
    while True:
        page = c.list_tasks_page(limit=2, selector="team", page_token=token)
        seen.extend(t.id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert seen == [web, *ml[::-1]]
    first = c.list_tasks_page(limit=2, selector="team")
    with pytest.raises(ClientError) as other:
        c.list_tasks_page(limit=2, selector="team=ml", page_token=first.next_page_token)
    assert other.value.code.name == "INVALID_ARGUMENT"
    assert str(other.value).endswith(
        "page_token: this token belongs to a listing with another selector or state; list "
        "again from the first page")

    with pytest.raises(ClientError) as bad:
        c.submit_task(["true"], labels={"bad key": "1"})
    assert bad.value.code.name == "INVALID_ARGUMENT"
    assert ("spec.labels[\"bad key\"]: the name 'bad key' must be 1-63 characters"
            in str(bad.value))
    with pytest.raises(ClientError) as bad:
        c.list_tasks(selector="a=b=c")
    assert bad.value.code.name == "INVALID_ARGUMENT"

    # labels are part of the spec a retried Submit must repeat
    once = c.submit_task(["true"], request_id="lab-1", labels={"a": "1"})
    assert c.submit_task(["true"], request_id="lab-1", labels={"a": "1"}).id == once.id
    with pytest.raises(ClientError) as reused:
        c.submit_task(["true"], request_id="lab-1", labels={"a": "2"})
    assert reused.value.code.name == "ALREADY_EXISTS"

    for task_id in [*ml, web, bare, once.id]:
        assert wait_done(c, task_id).state == SUCCEEDED
    # stored with the task: the same after a restart
    assert d.stop() == 0
    d.start()
    c = d.client()
    assert [t.id for t in c.list_tasks(selector="team=ml")] == ml[::-1]
    assert dict(c.get_task(web).spec.labels) == {"team": "web"}
    assert dict(c.get_task(bare).spec.labels) == {}
