"""Hostile layers: one per way a tar entry tries to land outside its layer directory.

Each is refused with UnsafeLayer naming the entry; nothing is written outside (a sentinel
directory the attacks aim at stays exactly as it was) and no layer, partial or whole, nor
temp directory, blob or record remains in the store.
"""

from __future__ import annotations

import os

import pytest

from corral.sandbox.images import ImageStore, UnsafeLayer

from ..unit.test_image_builder import Layer, digest, write_oci

OUT = "@OUT@"  # replaced by the sentinel directory's absolute path


def _attacks():
    return {
        "absolute path": (
            Layer().file("ok", b"1").file(f"{OUT}/evil", b"x"),
            f"{OUT}/evil", "absolute path"),
        "dotdot": (
            Layer().file("../../../../../../evil", b"x"),
            "../../../../../../evil", "'..' component"),
        "dotdot in the middle": (
            Layer().dir("a").file("a/../../evil", b"x"),
            "a/../../evil", "'..' component"),
        "entry under an absolute symlink": (
            Layer().symlink("esc", OUT).file("esc/evil", b"x"),
            "esc/evil", "it lies under the symlink on 'esc'"),
        "entry under a relative symlink": (
            Layer().symlink("esc", "../../../../../../../../" + OUT).file("esc/evil", b"x"),
            "esc/evil", "it lies under the symlink on 'esc'"),
        "link through a link": (
            Layer().symlink("l2", OUT).symlink("l1", "l2").file("l1/evil", b"x"),
            "l1/evil", "it lies under the symlink on 'l1'"),
        "directory replaced by a symlink": (
            Layer().dir("d").file("d/ok", b"1").symlink("d", OUT).file("d/evil", b"x"),
            "d/evil", "it lies under the symlink on 'd'"),
        "nested directory under a symlink": (
            Layer().symlink("esc", OUT).dir("esc/sub"),
            "esc/sub", "it lies under the symlink on 'esc'"),
        "hard link to an absolute path": (
            Layer().hardlink("h", f"{OUT}/f"), "h", "absolute path"),
        "hard link with dotdot": (
            Layer().hardlink("h", "../../../../../../../../" + OUT + "/f"),
            "h", "'..' component"),
        "hard link to an entry not yet made": (
            Layer().hardlink("h", "later").file("later", b"x"),
            "h", "hard link to 'later', which is not a file this layer made before it"),
        "hard link through a symlink": (
            Layer().dir("d").file("d/f", b"1").symlink("s", "d").hardlink("h", "s/f"),
            "h", "hard link to 's/f', which is not a file this layer made before it"),
        "hard link through a symlink pointing out": (
            Layer().symlink("s", OUT).hardlink("h", "s/f"),
            "h", "hard link to 's/f', which is not a file this layer made before it"),
        "character device": (
            Layer().dir("dev").device("dev/mem", 1, 1),
            "dev/mem", r"device node 1:1 \(only whiteouts may be devices\)"),
        "overlayfs xattr": (
            Layer().file("f", b"x", xattrs={"trusted.overlay.redirect": b"/etc"}),
            "f", "it carries the overlayfs xattr trusted.overlay.redirect"),
        "overlayfs user xattr": (
            Layer().dir("d").file("d/f", b"x", xattrs={"user.overlay.opaque": b"y"}),
            "d/f", "it carries the overlayfs xattr user.overlay.opaque"),
        "whiteout of no name": (
            Layer().file(".wh..", b""), ".wh..", "whiteout of no name"),
        "whiteout under a symlink": (
            Layer().symlink("s", OUT).whiteout("s/f"),
            "s/.wh.f", "it lies under the symlink on 's'"),
        "opaque marker under a symlink": (
            Layer().symlink("s", OUT).opaque("s"),
            "s/.wh..wh..opq", "it lies under the symlink on 's'"),
    }


def _aimed(layer: Layer, out: str) -> Layer:
    for info, _ in layer.entries:
        info.name = info.name.replace(OUT, out.lstrip("/") if not info.name.startswith(OUT)
                                      else out)
        info.linkname = info.linkname.replace(
            OUT, out.lstrip("/") if not info.linkname.startswith(OUT) else out)
    return layer


@pytest.mark.parametrize("attack", sorted(_attacks()))
def test_hostile_layer_is_refused_and_leaves_nothing(attack, tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    (out / "f").write_bytes(b"sentinel")
    layer, entry, why = _attacks()[attack]
    layer = _aimed(layer, str(out))
    entry = entry.replace(OUT, str(out))
    store = ImageStore(str(tmp_path / "store"))
    ref = write_oci(str(tmp_path / "img"), [Layer().file("base", b"b"), layer])

    with pytest.raises(UnsafeLayer) as caught:
        store.pull(ref)

    assert caught.value.entry == entry
    assert caught.value.layer == digest(layer.tar())
    import re
    assert re.fullmatch(rf"image: layer sha256:[0-9a-f]{{64}}: entry {re.escape(repr(entry))} "
                        rf"refused: {why}; nothing of the layer was kept", str(caught.value))
    assert sorted(os.listdir(out)) == ["f"]
    assert (out / "f").read_bytes() == b"sentinel"
    assert os.stat(out / "f").st_nlink == 1
    assert os.listxattr(out) == []
    # the clean base layer below it stays (it is whole); nothing of the hostile one
    assert os.listdir(os.path.join(store.root, "layers", "sha256")) == [
        digest(Layer().file("base", b"b").tar())[7:]]
    for sub in ("tmp", "images", "blobs/sha256"):
        assert os.listdir(os.path.join(store.root, sub)) == [], sub
