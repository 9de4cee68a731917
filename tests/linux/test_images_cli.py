"""`corral image pull|ls|inspect|rm|prune`, plain and --json, on a store in a temp dir."""

from __future__ import annotations

import json
import os
import re

import pytest

from corral.runtime.cli import main

from ..unit.test_image_builder import Layer, digest, sample_layers, write_oci


@pytest.fixture
def setup(tmp_path):
    layers = sample_layers()
    ref = write_oci(str(tmp_path / "img"), layers)
    return ref, [digest(layer.tar()) for layer in layers], str(tmp_path / "store")


def _json(capsys, argv: list[str]):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_pull_prints_a_line_per_layer_and_the_image(setup, capsys):
    ref, diff_ids, store = setup
    assert main(["image", "pull", "--store", store, ref]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(rf"{re.escape(ref)} sha256:[0-9a-f]{{12}} [0-9.]+ (B|kB|MB)\n", out)
    lines = err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        f"layer {i + 1}/3 {d[:19]} unpacked" for i, d in enumerate(diff_ids)]
    assert main(["image", "pull", "--store", store, ref]) == 0
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        f"layer {i + 1}/3 {d[:19]} present" for i, d in enumerate(diff_ids)]


def test_json_documents_of_every_verb(setup, capsys, tmp_path):
    ref, diff_ids, store = setup
    other = write_oci(str(tmp_path / "other"), [Layer().file("only", b"o" * 5000)])
    pulled = _json(capsys, ["image", "pull", "--json", "--store", store, ref])
    assert capsys.readouterr().err == ""
    assert pulled["ref"] == ref
    assert [layer["diff_id"] for layer in pulled["layers"]] == diff_ids
    _json(capsys, ["image", "pull", "--json", "--store", store, other])

    listed = _json(capsys, ["image", "ls", "--json", "--store", store])
    assert [r["ref"] for r in listed] == sorted([ref, other])

    inspected = _json(capsys, ["image", "inspect", "--json", "--store", store, ref])
    assert inspected["id"] == pulled["id"]
    assert inspected["layer_dirs"] == [
        os.path.join(store, "layers", "sha256", d[7:], "root") for d in diff_ids]
    assert inspected["config"]["config"]["WorkingDir"] == "/opt"

    removed = _json(capsys, ["image", "rm", "--json", "--store", store, ref])
    assert [(r["images"], r["layers"], r["blobs"]) for r in removed] == [
        ([ref], sorted(diff_ids), 2)]
    assert removed[0]["bytes_freed"] > 0
    assert _json(capsys, ["image", "prune", "--json", "--store", store]) == {
        "images": [], "layers": [], "blobs": 0, "temp_dirs": 0, "bytes_freed": 0,
        "in_use": []}
    assert [r["ref"] for r in _json(capsys, ["image", "ls", "--json", "--store", store])] == [
        other]


def test_errors_name_the_problem_and_set_the_exit_status(setup, capsys):
    ref, _, store = setup
    assert main(["image", "rm", "--store", store, ref]) == 1
    assert capsys.readouterr().err == (
        f"corral image rm: no image {ref!r} in the store {store}; pull it first "
        f"(corral image pull {ref})\n")
    assert main(["image", "pull", "--store", store, "registry://r/x"]) == 2
    assert capsys.readouterr().err == (
        "corral image pull: image 'registry://r/x': the registry:// form is not read; name a "
        "registry image docker://HOST/REPO[:TAG] or HOST/REPO[:TAG]\n")
    assert main(["image"]) == 2
    assert capsys.readouterr().err == (
        "corral image: name a verb: pull, ls, inspect, rm or prune\n")
