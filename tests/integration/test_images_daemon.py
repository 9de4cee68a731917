"""The daemon's Images service (runtime/images.py) through a real daemon: shared pulls with
progress, List/Get, Remove under a running sandbox, the image config on Exec, the GC bound,
bad input, and `corral create --image`."""

from __future__ import annotations

import json
import os
import random
import threading

import pytest

from corral.runtime.cli import main
from corral.runtime.client import ClientError
from corral.sandbox.images.store import ImageStore
from corral.v1 import image_pb2

from ..linux.test_image_run import app_layer, tools_layer, top_layer
from ..unit.test_image_builder import Layer, digest, write_oci
from .daemon_harness import collect_exec, sandbox_footprint, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def _config(layers: list[Layer], **config) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [digest(la.tar()) for la in layers]},
    }).encode()


def _payload_layer(name: str, size: int) -> Layer:
    """A layer of SIZE bytes that neither compress nor stay sparse (random, seeded)."""
    data = random.Random(name).randbytes(size)
    return Layer(compress=False).file(name, data)


@pytest.fixture
def store_root(tmp_path, monkeypatch) -> str:
    root = str(tmp_path / "store")
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", root)  # the daemon inherits it
    return root


def _events(stream, into: list) -> None:
    try:
        for event in stream:
            into.append(event)
    except ClientError as exc:
        into.append(exc)


def _layers(events: list) -> int:
    return sum(1 for e in events if not isinstance(e, Exception) and e.HasField("layer"))


def test_pulls_of_one_ref_share_one_pull_and_a_cancelled_one_ends_nothing(
        tmp_path, store_root, make_daemon):
    layers = [tools_layer(), app_layer(), _payload_layer("payload", 3 << 20)]
    ref = write_oci(str(tmp_path / "img"), layers)
    # the last blob is a FIFO: the pull blocks on it until the test writes it, so the
    # second and third Pulls surely find the first in progress
    blob = layers[-1].blob()
    fifo = str(tmp_path / "img" / "blobs" / "sha256" / digest(blob)[7:])
    os.unlink(fifo)
    os.mkfifo(fifo)
    daemon = make_daemon().start()
    client = daemon.client()
    first, second = [], []
    threads = [threading.Thread(target=_events, args=(client.image_pull(ref), first))]
    threads[0].start()
    try:
        assert wait_until(lambda: _layers(first) == 2)  # layers 1 and 2 done, 3 blocked
        cancelled = client.images.Pull(image_pb2.PullImageRequest(ref=ref),
                                       metadata=client.metadata)
        event = next(cancelled)  # it joined: the events so far come first
        assert getattr(event, event.WhichOneof("event")).index == 1
        cancelled.cancel()
        threads.append(threading.Thread(target=_events, args=(client.image_pull(ref), second)))
        threads[1].start()
        assert wait_until(lambda: _layers(second) == 2)
    finally:
        with open(fifo, "wb") as f:  # releases the pull on every path
            f.write(blob)
        for thread in threads:
            thread.join(60)
    for events in (first, second):
        assert [e.WhichOneof("event") for e in events if not e.HasField("bytes")] == [
            "layer", "layer", "layer", "done"]
        assert [(e.layer.index, e.layer.count, e.layer.state) for e in events
                if e.HasField("layer")] == [(1, 3, "unpacked"), (2, 3, "unpacked"),
                                            (3, 3, "unpacked")]
        read = [e.bytes for e in events if e.HasField("bytes") and e.bytes.index == 3]
        assert read[-1].read == read[-1].total == len(blob)
        assert events[-1].done.ref == ref
    assert first[-1].done == second[-1].done
    pulls = [r.detail for r in daemon.records("image.pull")]
    assert [(p["ref"], p["joined"]) for p in pulls] == [(ref, False), (ref, True), (ref, True)]
    pulled = daemon.records("image.pulled")
    assert [(r.detail["ref"], r.detail["watchers"]) for r in pulled] == [(ref, 3)]

    listed = client.images_list()
    assert [(i.ref, i.id, len(i.layers)) for i in listed] == [(ref, first[-1].done.id, 3)]
    got = client.image_get(first[-1].done.id[7:19])  # an id prefix names it too
    assert got.image == first[-1].done
    assert list(got.config.env) == ["PATH=/usr/bin:/bin", "IMAGE=test"]
    assert (list(got.config.cmd), got.config.working_dir) == (["/bin/sh"], "/opt")


def test_remove_leaves_a_running_sandbox_working_and_the_layers_go_after_it(
        tmp_path, store_root, make_daemon):
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer(), top_layer()])
    daemon = make_daemon().start()
    client = daemon.client()
    done = [e for e in client.image_pull(ref) if e.HasField("done")]
    sb = client.create_sandbox(image=ref, ttl_s=600)
    with pytest.raises(ClientError) as exc:
        daemon.client(tenant="acme").image_remove(ref)
    assert exc.value.code.name == "PERMISSION_DENIED"
    removed = client.image_remove(ref)
    assert (removed.ref, list(removed.removed_layers), len(removed.in_use_layers)) == (
        ref, [], 3)
    res = collect_exec(client.exec(sb.id, ["/bin/sh", "-c", "cat /image-only-file"]))
    assert (res.returncode, res.stdout) == (0, b"from the image\n")
    with pytest.raises(ClientError) as exc:
        client.image_get(ref)
    assert exc.value.code.name == "NOT_FOUND"
    record = daemon.records("image.remove")[-1]
    assert (record.tenant, record.detail["ref"], len(record.detail["in_use"])) == (
        "local", ref, 3)
    client.destroy_sandbox(sb.id)
    assert wait_until(lambda: sandbox_footprint(sb.id) == {})
    assert sorted(ImageStore(store_root).prune().layers) == sorted(
        layer.diff_id for layer in done[0].done.layers)


def test_exec_applies_the_image_config_under_the_request(tmp_path, store_root, make_daemon):
    layers = [tools_layer(), app_layer(), top_layer()]
    ref = write_oci(str(tmp_path / "img"), layers, config=_config(
        layers, Env=["FROM_IMAGE=1", "SHARED=image", "PATH=/usr/bin:/bin"],
        Entrypoint=["/bin/sh", "-c"],
        Cmd=['echo "cmd $FROM_IMAGE $SHARED $(pwd) $(id -u):$(id -g)"'],
        WorkingDir="/home/app", User="app"))
    plain = write_oci(str(tmp_path / "plain"), layers, config=_config(layers))
    ImageStore(store_root).pull(ref)
    ImageStore(store_root).pull(plain)
    daemon = make_daemon().start()
    client = daemon.client()
    sb = client.create_sandbox(image=ref, env={"SHARED": "spec"}, ttl_s=600)

    def run(argv, **kw):
        res = collect_exec(client.exec(sb.id, argv, **kw))
        return res.returncode, res.stdout.decode(), res.stderr.decode()

    # no argv: Entrypoint + Cmd, as the image's User, in its WorkingDir; the spec's env wins
    assert run([]) == (0, "cmd 1 spec /home/app 1000:1001\n", "")
    show = ["/bin/sh", "-c", 'echo "$FROM_IMAGE $SHARED $(pwd) $(id -u)"']
    assert run(show) == (0, "1 spec /home/app 1000\n", "")
    assert run(show, env={"SHARED": "request"}, cwd="/tmp") == (0, "1 request /tmp 1000\n", "")
    # the request's user wins over the image's: by name, by number, with a group
    ids = ["/usr/bin/id", "-u", "-g"]
    assert run(["/bin/sh", "-c", "echo $(id -u):$(id -g)"], user="root") == (0, "0:0\n", "")
    assert run(["/bin/sh", "-c", "echo $(id -u):$(id -g)"], user="4242:app") == (
        0, "4242:1001\n", "")
    for bad, problem in (("nobody", "user 'nobody': no user 'nobody' in its /etc/passwd"),
                         ("70000", "'70000' is 70000:0; the sandbox's ids are 0..65535")):
        with pytest.raises(ClientError) as exc:
            collect_exec(client.exec(sb.id, ids, user=bad))
        assert (exc.value.code.name, str(exc.value)) == (
            "INVALID_ARGUMENT", f"INVALID_ARGUMENT: user: {problem}")
    started = [r.detail["argv"] for r in daemon.records("exec.start")]
    assert started[0] == ["/bin/sh", "-c", 'echo "cmd $FROM_IMAGE $SHARED $(pwd) '
                                           '$(id -u):$(id -g)"']

    bare = client.create_sandbox(image=plain, ttl_s=600)
    with pytest.raises(ClientError) as exc:
        collect_exec(client.exec(bare.id, []))
    assert (exc.value.code.name, str(exc.value)) == (
        "INVALID_ARGUMENT", "INVALID_ARGUMENT: argv: no command given and the image has no "
                            "Entrypoint or Cmd")


def test_gc_removes_the_least_recently_used_unheld_image(tmp_path, store_root, make_daemon):
    unique = 2 << 20
    images = {}
    for name in ("a", "b", "c"):
        layers = [tools_layer(), app_layer(), _payload_layer(f"payload-{name}", unique)]
        images[name] = write_oci(str(tmp_path / name), layers)
    # the bound from the real sizes on this filesystem: room for two images, not three
    scratch = ImageStore(str(tmp_path / "scratch"))
    records = [scratch.pull(images[name]) for name in ("a", "b")]
    shared = sum(scratch.layer_bytes(layer.diff_id) for layer in records[0].layers[:2])
    payload = scratch.layer_bytes(records[0].layers[2].diff_id)
    bound = shared + 2 * payload + payload // 2
    daemon = make_daemon(config=f"image_store_max_bytes = {bound}\n").start()
    client = daemon.client()

    def pull(name: str) -> None:
        assert list(client.image_pull(images[name]))[-1].HasField("done")

    pull("a")
    sb = client.create_sandbox(image=images["a"], ttl_s=600)  # a is the oldest, but held
    pull("b")
    assert daemon.records("image.gc") == []  # under the bound: nothing to do
    pull("c")
    assert wait_until(lambda: daemon.records("image.gc") != [])
    gc = daemon.records("image.gc")[0].detail
    assert (gc["removed"], gc["held"]) == ([images["b"]], [images["a"]])
    assert gc["store_bytes"] <= bound
    assert sorted(i.ref for i in client.images_list()) == [images["a"], images["c"]]
    res = collect_exec(client.exec(sb.id, ["/bin/sh", "-c", "cat /image-only-file"]))
    assert (res.returncode, res.stdout) == (0, b"from the image\n")


def test_bad_input_gets_the_documented_codes(tmp_path, store_root, make_daemon):
    daemon = make_daemon().start()
    client = daemon.client()
    tenant = daemon.client(tenant="acme")
    cases = [
        (lambda: client.image_get(""), "INVALID_ARGUMENT", "ref: is empty"),
        (lambda: list(client.image_pull("")), "INVALID_ARGUMENT", "ref: is empty"),
        (lambda: list(client.image_pull("oci:relative/dir")), "INVALID_ARGUMENT",
         "ref: 'oci:relative/dir': a oci: path must be absolute"),
        (lambda: client.image_get("oci:/nonexistent:latest"), "NOT_FOUND", "no image"),
        (lambda: list(client.image_pull("oci:/nonexistent")), "NOT_FOUND", "oci:/nonexistent"),
        (lambda: list(client.image_pull("localhost:1/none:1")), "FAILED_PRECONDITION",
         "ref: localhost:1/none:1: registry localhost:1: connection refused"),
        (lambda: list(tenant.image_pull(f"oci:{tmp_path}")), "PERMISSION_DENIED",
         "ref: pulling oci: refs"),
        (lambda: client.image_remove("oci:/nonexistent:latest"), "NOT_FOUND", "no image"),
    ]
    for call, code, start in cases:
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.code.name == code
        assert str(exc.value).startswith(f"{code}: {start}")


def test_corral_create_image_pulls_through_the_daemon(tmp_path, store_root, make_daemon,
                                                      capfd, monkeypatch):
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer(), top_layer()])
    daemon = make_daemon().start()
    monkeypatch.chdir(tmp_path)  # a relative path: the CLI makes it absolute
    relative = "oci:img:latest"
    assert main(["create", "--socket", daemon.socket, "--image", relative]) == 0
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert [line.split()[3] for line in lines[:3]] == ["1/3", "2/3", "3/3"]
    assert lines[3].startswith(f"corral: create: pulled {ref} sha256:")
    sandbox_id = out.strip()
    client = daemon.client()
    assert client.get_sandbox(sandbox_id).spec.image == ref
    res = collect_exec(client.exec(sandbox_id, ["/bin/sh", "-c", "cat /image-only-file"]))
    assert (res.returncode, res.stdout) == (0, b"from the image\n")
    # the second create finds it in the store: no pull
    assert main(["create", "--socket", daemon.socket, "--image", relative]) == 0
    assert capfd.readouterr().err == ""
    assert len(daemon.records("image.pull")) == 1



def test_the_gc_bound_is_a_size_named_when_bad(tmp_path):
    from corral.runtime.config import load
    from corral.sandbox.errors import InvalidSpec

    path = tmp_path / "corral.toml"
    path.write_text('image_store_size = "3G"\n')
    assert load(str(path), {}).image_store_max_bytes == 3 << 30
    path.write_text("image_store_max_bytes = -1\n")
    with pytest.raises(InvalidSpec, match=r"^image_store_max_bytes: -1 must be a size in "
                                          r"bytes >= 0 \(0: no bound\)$"):
        load(str(path), {})
