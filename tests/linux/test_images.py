"""The image store on real images built here: layouts and docker save tarballs in, layers
unpacked once with whiteouts, links, xattrs, owners and holes kept, and an overlay of them
that reads as the image."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from corral.sandbox.images import ImageNotFound, ImageStore, LayerDigestMismatch
from corral.sandbox.images.errors import UnsupportedImage

from ..unit.test_image_builder import (
    Layer,
    config_for,
    digest,
    sample_layers,
    write_docker_archive,
    write_oci,
)


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "store"))


def _tree(root: str) -> list[str]:
    out = []
    for top, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            out.append(os.path.relpath(os.path.join(top, name), root))
    return sorted(out)


def test_pull_oci_layout_unpacks_each_layer_with_its_metadata(store, tmp_path):
    layers = sample_layers()
    ref = write_oci(str(tmp_path / "img"), layers)
    events = []
    record = store.pull(ref, progress=events.append)

    diff_ids = [digest(layer.tar()) for layer in layers]
    assert [(e.index, e.count, e.diff_id, e.state) for e in events] == [
        (i + 1, 3, d, "unpacked") for i, d in enumerate(diff_ids)]
    assert record.ref == ref
    assert record.id == digest(config_for(layers))
    rootfs = store.rootfs(ref)
    assert rootfs.layers == tuple(store.layer_dir(d) + "/root" for d in diff_ids)
    assert rootfs.config["config"]["Env"] == ["PATH=/usr/bin:/bin", "IMAGE=test"]

    base, change, top = rootfs.layers
    assert _tree(base) == sorted([
        "bin", "etc", "etc/hostname", "etc/owned", "etc/suid", "etc/xattr", "opt",
        "opt/data", "opt/data/a", "opt/data/b", "ro", "ro/inside", "run", "run/pipe", "usr",
        "usr/abs", "usr/bin", "usr/bin/tool", "usr/bin/tool-link", "usr/sparse"])
    assert stat.S_IMODE(os.lstat(f"{base}/ro").st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(f"{base}/run").st_mode) == 0o1777
    pipe = os.lstat(f"{base}/run/pipe")
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o620
    st = os.lstat(f"{base}/etc/owned")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o640)
    assert stat.S_IMODE(os.lstat(f"{base}/etc/suid").st_mode) == 0o4755
    assert os.getxattr(f"{base}/etc/xattr", "user.corral") == b"hello"
    assert os.readlink(f"{base}/bin") == "usr/bin"
    assert os.readlink(f"{base}/usr/abs") == "/etc/hostname"
    tool, link = os.lstat(f"{base}/usr/bin/tool"), os.lstat(f"{base}/usr/bin/tool-link")
    assert (tool.st_ino, tool.st_nlink) == (link.st_ino, 2)
    sparse = os.lstat(f"{base}/usr/sparse")
    assert sparse.st_size == (8 << 20) + 3
    assert sparse.st_blocks * 512 <= 64 << 10  # 8 MiB of zeros cost no blocks
    with open(f"{base}/usr/sparse", "rb") as f:
        f.seek(8 << 20)
        assert f.read() == b"end"
    assert int(os.lstat(f"{base}/etc/hostname").st_mtime) == 1_700_000_000
    assert int(os.lstat(f"{base}/etc").st_mtime) == 1_700_000_000

    wh = os.lstat(f"{change}/etc/hostname")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    assert os.getxattr(f"{change}/opt/data", "trusted.overlay.opaque") == b"y"
    assert _tree(change) == sorted(["etc", "etc/hostname", "new", "new/implicit",
                                    "new/implicit/parent", "opt", "opt/data", "opt/data/c"])
    assert _tree(top) == ["top"]

    meta = json.load(open(os.path.join(os.path.dirname(change), "layer.json")))
    assert (meta["whiteouts"], meta["opaque_dirs"]) == (1, 1)
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_overlay_of_the_layers_reads_as_the_image(store, tmp_path):
    ref = write_oci(str(tmp_path / "img"), sample_layers())
    store.pull(ref)
    lower = ":".join(reversed(store.rootfs(ref).layers))  # overlayfs: topmost first
    merged = tmp_path / "merged"
    merged.mkdir()
    script = (f"mount -t overlay overlay -o ro,lowerdir={lower} {merged} && "
              f"cd {merged} && ls -A etc opt/data && cat bin/tool top")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, check=True).stdout
    assert out == "etc:\nowned\nsuid\nxattr\n\nopt/data:\nc\ntool\ntop\n"


def test_docker_archive_shares_layers_with_the_same_image_from_a_layout(store, tmp_path):
    layers = sample_layers()
    oci = write_oci(str(tmp_path / "img"), layers)
    archive = write_docker_archive(str(tmp_path / "img.tar"), layers)
    store.pull(oci)
    events = []
    record = store.pull(archive, progress=events.append)
    assert [e.state for e in events] == ["present"] * 3
    assert record.ref == archive and record.id == store.get(oci).id
    assert store.rootfs(archive).layers == store.rootfs(oci).layers
    assert [r.ref for r in store.images()] == sorted([oci, archive])
    assert len(os.listdir(os.path.join(store.root, "layers", "sha256"))) == 3


def test_tag_selects_the_manifest_and_several_need_one(store, tmp_path):
    root = str(tmp_path / "img")
    write_oci(root, [Layer().file("one", b"1")], tag="one")
    write_oci(root, [Layer().file("two", b"2")], tag="two")
    store.pull(f"oci:{root}:two")
    assert os.listdir(store.rootfs(f"oci:{root}:two").layers[0]) == ["two"]
    with pytest.raises(ImageNotFound, match=r"index.json has 2 manifests; name one with "
                                            r"oci:.*:TAG \(tags: one, two\)$"):
        store.pull(f"oci:{root}")
    with pytest.raises(ImageNotFound, match=r"no manifest tagged 'three'"):
        store.pull(f"oci:{root}:three")


def _assert_nothing_kept(store):
    for sub in ("layers/sha256", "tmp", "images", "blobs/sha256"):
        assert os.listdir(os.path.join(store.root, sub)) == [], sub


def test_layer_blob_with_wrong_digest_is_refused_and_nothing_is_stored(store, tmp_path):
    layer = Layer().file("a", b"a")
    ref = write_oci(str(tmp_path / "img"), [layer])
    blob_path = os.path.join(tmp_path, "img", "blobs", "sha256", digest(layer.blob())[7:])
    with open(blob_path, "wb") as f:  # same tar, so the same diff_id; another gzip blob
        import gzip
        f.write(gzip.compress(layer.tar(), mtime=1))
    with pytest.raises(LayerDigestMismatch,
                       match=r"layer blob has digest sha256:[0-9a-f]{64}, not the manifest's "
                             + digest(layer.blob()) + "; nothing was kept$"):
        store.pull(ref)
    _assert_nothing_kept(store)


def test_layer_with_wrong_diff_id_is_refused_and_nothing_is_stored(store, tmp_path):
    layers = [Layer().file("a", b"a")]
    wrong = digest(b"something else")
    ref = write_oci(str(tmp_path / "img"), layers, config=config_for(layers, [wrong]))
    with pytest.raises(LayerDigestMismatch, match=r"unpacks to sha256:[0-9a-f]{64}, not the "
                                                  r"config's diff_id " + wrong):
        store.pull(ref)
    _assert_nothing_kept(store)


def test_config_with_wrong_digest_is_refused(store, tmp_path):
    layers = [Layer().file("a", b"a")]
    ref = write_oci(str(tmp_path / "img"), layers)
    config = config_for(layers)
    with open(os.path.join(tmp_path, "img", "blobs", "sha256", digest(config)[7:]), "ab") as f:
        f.write(b" ")
    with pytest.raises(LayerDigestMismatch, match=r": config has digest sha256:[0-9a-f]{64}, "
                                                  r"not " + digest(config)):
        store.pull(ref)
    _assert_nothing_kept(store)


def test_zstd_layer_is_refused_with_a_clear_message(store, tmp_path):
    layer = Layer().file("a", b"a")
    ref = write_oci(str(tmp_path / "img"), [layer])
    blob_path = os.path.join(tmp_path, "img", "blobs", "sha256", digest(layer.blob())[7:])
    with open(blob_path, "wb") as f:
        f.write(b"\x28\xb5\x2f\xfd" + bytes(64))
    with pytest.raises(UnsupportedImage, match=r"is zstd-compressed, which this Python cannot "
                                               r"read; re-save the image with gzip layers"):
        store.pull(ref)
    _assert_nothing_kept(store)


def test_registry_reference_is_refused_clearly(store, monkeypatch, tmp_path):
    with pytest.raises(UnsupportedImage, match=r"^image 'registry://r/x': the registry:// form "
                       r"is not read; name a registry image docker://HOST/REPO\[:TAG\] or "
                       r"HOST/REPO\[:TAG\]$"):
        store.pull("registry://r/x")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(UnsupportedImage, match=r"^image 'python:3.12': no Docker engine at "
                                               rf"unix://{tmp_path}/no-engine.sock \(set "
                                               r"DOCKER_HOST\), and pulling from a registry"):
        store.pull("python:3.12")


def test_rm_keeps_layers_another_image_uses_and_prune_frees_the_rest(store, tmp_path):
    shared = Layer().file("shared", b"s" * 10000)
    only_a = Layer().file("a", b"a" * 20000)
    ref_a = write_oci(str(tmp_path / "a"), [shared, only_a])
    ref_b = write_oci(str(tmp_path / "b"), [shared])
    store.pull(ref_a)
    store.pull(ref_b)
    freed = store.remove(ref_a)
    assert freed.images == [ref_a]
    assert freed.layers == [digest(only_a.tar())]
    assert freed.blobs == 2 and freed.bytes >= 20000
    assert store.rootfs(ref_b).layers == (store.layer_dir(digest(shared.tar())) + "/root",)
    with pytest.raises(ImageNotFound, match=r"^no image 'oci:.*/a:latest' in the store"):
        store.get(ref_a)
    os.mkdir(os.path.join(store.root, "tmp", digest(only_a.tar())[7:] + ".1.dead"))
    freed = store.prune()
    assert (freed.layers, freed.blobs, freed.temp_dirs) == ([], 0, 1)
    freed = store.remove(store.get(ref_b).id[7:19])  # by short id
    assert freed.layers == [digest(shared.tar())]
    _assert_nothing_kept(store)


class _RawLayer(Layer):
    """A layer whose tar another tool wrote."""

    def __init__(self, raw: bytes):
        super().__init__(compress=True)
        self.raw = raw

    def tar(self) -> bytes:
        return self.raw


def test_gnu_sparse_member_stays_sparse(store, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "holey", "wb") as f:
        f.truncate(16 << 20)
        f.seek(8 << 20)
        f.write(b"mid")
    subprocess.run(["tar", "--sparse", "--format=pax", "-C", str(tree), "-cf",
                    str(tmp_path / "layer.tar"), "holey"], check=True)
    layer = _RawLayer((tmp_path / "layer.tar").read_bytes())
    ref = write_oci(str(tmp_path / "img"), [layer])
    store.pull(ref)
    path = os.path.join(store.rootfs(ref).layers[0], "holey")
    st = os.stat(path)
    assert st.st_size == 16 << 20
    assert st.st_blocks * 512 <= 64 << 10
    with open(path, "rb") as f:
        f.seek(8 << 20)
        assert f.read(4) == b"mid\0"


def test_later_entries_replace_earlier_ones_without_following_links(store, tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    layer = (Layer().symlink("x", str(out)).file("x", b"file now")
             .dir("d").file("d/old", b"1").file("d", b"was a dir")
             .file("f", b"1").dir("f").file("f/inside", b"2"))
    ref = write_oci(str(tmp_path / "img"), [layer])
    store.pull(ref)
    root = store.rootfs(ref).layers[0]
    assert _tree(root) == ["d", "f", "f/inside", "x"]
    with open(f"{root}/x", "rb") as f:
        assert f.read() == b"file now"
    with open(f"{root}/d", "rb") as f:
        assert f.read() == b"was a dir"
    assert os.listdir(out) == []


def test_rm_and_prune_leave_layers_a_sandbox_holds(store, tmp_path):
    layer = Layer().file("data", b"d" * 30000)
    ref = write_oci(str(tmp_path / "img"), [layer])
    store.pull(ref)
    held = store.hold(ref)
    assert held.rootfs == store.rootfs(ref)
    freed = store.remove(ref)
    assert (freed.images, freed.layers, freed.in_use) == ([ref], [], [digest(layer.tar())])
    assert os.listdir(held.rootfs.layers[0]) == ["data"]
    assert store.prune().in_use == [digest(layer.tar())]
    held.close()
    freed = store.prune()
    assert (freed.layers, freed.in_use) == ([digest(layer.tar())], [])
    assert freed.bytes >= 30000
    assert not os.path.exists(held.rootfs.layers[0])
    for sub in ("layers/sha256", "tmp", "images", "blobs/sha256", "locks"):
        assert os.listdir(os.path.join(store.root, sub)) == [], sub


def test_unprivileged_unpack_marks_opaque_dirs_for_a_userxattr_mount(store, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # what an unprivileged store does
    ref = write_oci(str(tmp_path / "img"), sample_layers())
    store.pull(ref)
    base, change, _ = store.rootfs(ref).layers
    assert os.getxattr(f"{change}/opt/data", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(f"{change}/opt/data")
    assert os.lstat(f"{base}/etc/owned").st_uid == 0  # ids from the tar need root
    assert stat.S_IMODE(os.lstat(f"{base}/etc/owned").st_mode) == 0o640


def test_truncated_layer_blob_is_refused_and_nothing_is_stored(store, tmp_path):
    layer = Layer().file("a", os.urandom(200_000))
    ref = write_oci(str(tmp_path / "img"), [layer])
    blob_path = os.path.join(tmp_path, "img", "blobs", "sha256", digest(layer.blob())[7:])
    with open(blob_path, "r+b") as f:
        f.truncate(100_000)
    ended = r"Compressed file ended before the end-of-stream marker was reached"
    with pytest.raises(LayerDigestMismatch, match=r"^oci:.*: layer sha256:[0-9a-f]{64} is "
                                                  rf"not a valid compressed tar \({ended}\)$"):
        store.pull(ref)
    _assert_nothing_kept(store)


@pytest.mark.parametrize("blobs", [False, True], ids=["legacy", "docker-25"])
def test_docker_archive_layouts(store, tmp_path, blobs):
    layers = sample_layers()
    ref = write_docker_archive(str(tmp_path / "img.tar"), layers, blobs=blobs)
    record = store.pull(ref)
    assert record.id == digest(config_for(layers))
    assert [layer.digest for layer in record.layers] == (
        [digest(layer.tar()) for layer in layers] if blobs else [None] * 3)
    assert os.listdir(store.rootfs(ref).layers[2]) == ["top"]


def test_image_index_picks_the_host_platform(store, tmp_path):
    root = str(tmp_path / "img")
    write_oci(root, [Layer().file("arm", b"a")], tag="arm")
    write_oci(root, [Layer().file("amd", b"x")], tag="amd")
    with open(os.path.join(root, "index.json")) as f:
        arm, amd = json.load(f)["manifests"]
    arm["platform"] = {"os": "linux", "architecture": "arm64"}
    amd["platform"] = {"os": "linux", "architecture": "amd64"}
    index = json.dumps({"schemaVersion": 2, "manifests": [arm, amd],
                        "mediaType": "application/vnd.oci.image.index.v1+json"}).encode()
    with open(os.path.join(root, "blobs", "sha256", digest(index)[7:]), "wb") as f:
        f.write(index)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest(index),
             "size": len(index), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]},
            f)
    store.pull(f"oci:{root}:multi")
    assert os.listdir(store.rootfs(f"oci:{root}:multi").layers[0]) == ["amd"]
    with open(os.path.join(root, "blobs", "sha256", digest(index)[7:]), "ab") as f:
        f.write(b" ")
    with pytest.raises(LayerDigestMismatch, match=r": image index has digest sha256:"):
        store.pull(f"oci:{root}")


def test_a_layer_directory_without_its_record_is_not_taken_for_complete(store, tmp_path):
    layer = Layer().file("a", b"a")
    ref = write_oci(str(tmp_path / "img"), [layer])
    planted = store.layer_dir(digest(layer.tar()))
    os.makedirs(os.path.join(planted, "root"))
    with pytest.raises(ImageNotFound, match=r"^no image"):
        store.rootfs(ref)
    events = []
    store.pull(ref, progress=events.append)
    assert [e.state for e in events] == ["unpacked"]
    assert os.listdir(store.rootfs(ref).layers[0]) == ["a"]
    assert os.listdir(os.path.join(store.root, "tmp")) == []
