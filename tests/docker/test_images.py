"""spec.image on the docker backend: the same REF as the native backend (oci:, docker-archive:,
a name the engine holds), loaded once into a private engine, and the same outcomes on both
backends: the image's own Python, the image config's user, env and cwd, and the probe
suite's verdicts (a setuid binary of the image grants nothing on either)."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest

from corral.sandbox import Sandbox, SandboxSpec
from corral.sandbox.backends.docker import DockerSandbox, client
from corral.sandbox.backends.docker import image as docker_image
from corral.sandbox.backends.docker.images import LOADED_REPOSITORY
from corral.sandbox.images.errors import ImageNotFound
from corral.sandbox.images.store import ImageStore
from corral.sandbox.probes import suite

from ..linux.test_image_run import _config, app_layer, python_layer, tools_layer
from ..unit.test_image_builder import Layer, digest, write_docker_archive, write_oci

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

#: What the image's Python says of itself and its process (posix: no stdlib beyond the
#: few files python_layer() carries).
REPORT = ("import sys, posix; print(sys.prefix, posix.getuid(), posix.getgid(), "
          "posix.getcwd(), posix.environ.get(b'IMAGE'), posix.environ.get(b'PATH'))")


def _python_image(root: str) -> str:
    layers = [tools_layer(), python_layer(), app_layer()]
    config = _config(layers, Env=["PATH=/opt/py/bin:/usr/bin:/bin", "IMAGE=from-image"],
                     WorkingDir="/home/app", User="app", Cmd=["/bin/sh"],
                     Volumes={"/data": {}})
    return write_oci(root, layers, config=config)


@pytest.fixture
def store(tmp_path, monkeypatch) -> ImageStore:
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    return ImageStore()


def _native(ref: str, store: ImageStore) -> Sandbox:
    store.pull(ref)
    return Sandbox(SandboxSpec(image=ref))


def _docker(ref: str, url: str) -> DockerSandbox:
    return DockerSandbox(SandboxSpec(image=ref), docker_host=url)


def _as_docker_runs(sandbox, args: list[str]) -> tuple[int, bytes, bytes]:
    """args run as `corral run --image` runs them: the image's Env, WorkingDir and User."""
    cmd = sandbox.image_command(args)
    kw = {"env": cmd.env, "user": cmd.user, **({"cwd": cmd.cwd} if cmd.cwd else {})}
    proc = sandbox.exec(cmd.argv, **kw)
    out, err = proc.communicate()
    return proc.wait(), out, err


def test_the_same_image_gives_the_same_python_user_env_and_cwd(tmp_path, store, docker_host):
    ref = _python_image(str(tmp_path / "img"))
    argv = ["/opt/py/bin/python3", "-I", "-S", "-c", REPORT]
    with _native(ref, store) as native, _docker(ref, docker_host) as container:
        seen = [_as_docker_runs(sb, argv) for sb in (native, container)]
        notes = [sb.image_config.get("Volumes") for sb in (native, container)]
    expected = b"/opt/py 1000 1001 /home/app b'from-image' b'/opt/py/bin:/usr/bin:/bin'\n"
    assert seen == [(0, expected, b"")] * 2
    assert notes == [{"/data": {}}] * 2  # the same unsupported-config note on both


def test_an_oci_image_is_loaded_once_under_a_name_of_its_id(tmp_path, docker_host):
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer()])
    api = client(docker_host)
    with _docker(ref, docker_host) as sb:
        proc = sb.exec(["/bin/sh", "-c", "cat /image-only-file; id -u"])
        assert proc.communicate() == (b"from the image\n" + f"{sb.spec.uid_base}\n".encode(),
                                      b"")
        image_id = api.inspect_container(sb.container_id)["Image"]
    tag = image_id.removeprefix("sha256:")
    assert api.inspect_image(f"{LOADED_REPOSITORY}:{tag}")["Id"] == image_id
    created = api.inspect_image(image_id)["Metadata"]["LastTagTime"]
    with _docker(ref, docker_host) as sb:  # found by its name: not loaded (tagged) again
        assert sb.exec(["/usr/bin/cat", "/image-only-file"]).communicate()[0] == \
            b"from the image\n"
    assert api.inspect_image(image_id)["Metadata"]["LastTagTime"] == created


def test_a_docker_archive_keeps_its_diff_ids_and_id(tmp_path, docker_host):
    layers = [tools_layer(), app_layer()]
    ref = write_docker_archive(str(tmp_path / "img.tar"), layers)
    api = client(docker_host)
    with _docker(ref, docker_host) as sb:
        assert sb.exec(["/usr/bin/cat", "/image-only-file"]).communicate()[0] == \
            b"from the image\n"
        info = api.inspect_image(api.inspect_container(sb.container_id)["Image"])
    assert info["RootFS"]["Layers"] == [digest(la.tar()) for la in layers]


def test_a_name_the_engine_holds_is_used_as_it_is(tmp_path, docker_host):
    layer = Layer(compress=False).file("marker", b"imported\n")
    api = client(docker_host)
    name = "corral-test/imported:1"
    api.import_image_from_data(io.BytesIO(_with_base(layer)), repository="corral-test/imported",
                               tag="1")
    try:
        with _docker(name, docker_host) as sb:
            assert sb.exec(["/usr/bin/cat", "/marker"]).communicate() == (b"imported\n", b"")
    finally:
        api.remove_image(name, force=True)


def _with_base(layer: Layer) -> bytes:
    """layer's files over the tools layer's, as one tar (what `docker import` takes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for part in (tools_layer(), layer):
            for info, data in part.entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_a_missing_image_is_a_clear_error_and_leaves_nothing(tmp_path, docker_host):
    for ref, message in (
            (f"oci:{tmp_path}/none", f"^oci:{tmp_path}/none: {tmp_path}/none is not an OCI "
                                     f"image layout \\(no index.json\\)$"),
            ("corral-test/never:1", f"^image 'corral-test/never:1' is not in the Docker "
                                    f"engine at {docker_host}$")):
        sb = _docker(ref, docker_host)
        with pytest.raises(ImageNotFound, match=message):
            sb.start()
        assert sb.container_id is None


def test_a_registry_ref_is_pulled_by_the_engine_and_by_the_store_alike(
        tmp_path, store, docker_host, monkeypatch):
    from corral.sandbox.images.sources import push_image

    from ..linux.registry_server import docker_registry

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    src = _python_image(str(tmp_path / "img"))
    argv = ["/opt/py/bin/python3", "-I", "-S", "-c", REPORT]
    with docker_registry(str(tmp_path / "registry")) as host:
        ref = f"{host}/corral/py:1"
        push_image(src, ref, scratch=str(tmp_path))
        with _native(ref, store) as native, _docker(ref, docker_host) as container:
            seen = [_as_docker_runs(sb, argv) for sb in (native, container)]
            image_id = client(docker_host).inspect_container(container.container_id)["Image"]
        missing = _docker(f"{host}/corral/py:absent", docker_host)
        with pytest.raises(ImageNotFound, match=f"^image {host}/corral/py:absent: the engine "
                                                f"at {docker_host} could not pull it: "):
            missing.start()
    assert seen[0] == seen[1] and seen[0][0] == 0
    assert image_id == store.get(ref).id  # one image id: the config's digest
    client(docker_host).remove_image(image_id, force=True)


# == the probe suite on one image, both backends ==============================================


def _probe_image(root: str) -> str:
    """The docker backend's base root filesystem (host programs, a whole Python, newgrp
    setuid-root) as an image layer: every probe has what it runs."""
    from corral.sandbox import contain

    plan = docker_image.rootfs_plan()
    for inside in contain.support_files():  # each backend brings its own copy
        plan.generated.pop(inside, None)
    buf = io.BytesIO()
    plan.write_tar(buf)
    layer = _RawLayer(buf.getvalue())
    config = _config([layer], Env=["PATH=/usr/local/bin:/usr/bin:/bin"])
    return write_oci(root, [layer], config=config)


@dataclasses.dataclass
class _RawLayer:
    """An uncompressed layer tar made elsewhere (write_oci's Layer interface)."""

    raw: bytes
    compress: bool = False

    def tar(self) -> bytes:
        return self.raw

    def blob(self) -> bytes:
        return self.raw


@dataclasses.dataclass
class _ImageContext(suite.Context):
    """A probe run whose sandboxes all run on one image."""

    image: str = ""

    def spec(self, **overrides) -> SandboxSpec:
        # backend "native" in the spec: the docker backend is chosen by open() below
        return suite.suite_spec("native", self.profile, image=self.image, **overrides)

    def open(self, **overrides):
        spec = self.spec(**overrides)
        sb = DockerSandbox(spec, docker_host=self.docker_host) if self.backend == "docker" \
            else Sandbox(spec)
        sb.start()
        return sb


def _verdicts(backend: str, ref: str, docker_host: str | None) -> dict[str, tuple[str, str]]:
    ctx = _ImageContext(backend, "default", docker_host, image=ref)
    ctx.shared = ctx.open()
    try:
        return {p.name: (r.verdict, r.outcome) for p in suite.PROBES
                for r in [suite.run_probe(ctx, p)]}
    finally:
        ctx.shared.destroy()


#: probe -> (native, docker) outcome where both contain it, each for its own reason:
#: landlock answers before the capability check (mknod); no /sys at all natively, where
#: docker shows it read-only (or its firmware directory empty); a native sandbox's uid 0
#: owns the image's files (ETXTBSY on a running binary) where docker's uid_base does not
#: (EACCES); no cgroup tree in a native sandbox's view.
BACKEND_REASONS = {"mknod-char": ("EACCES", "EPERM"), "mknod-block": ("EACCES", "EPERM"),
                   "sys-write": ("ENOENT", "EROFS"), "sys-firmware": ("ENOENT", "ok"),
                   "write-usr": ("ETXTBSY", "EACCES"),
                   "proc-self-exe-write": ("ETXTBSY", "EACCES"),
                   "cgroup-procs": ("ENOENT", "EACCES")}


def test_the_probe_suite_on_an_image_gives_the_same_verdicts_on_both(tmp_path, store,
                                                                      docker_host):
    ref = _probe_image(str(tmp_path / "probe-img"))
    store.pull(ref)
    native = _verdicts("native", ref, None)
    docker = _verdicts("docker", ref, docker_host)
    assert {n: v for n, v in native.items() if v[0] != suite.CONTAINED} == {}
    assert {n: v for n, v in docker.items() if v[0] != suite.CONTAINED} == {}
    assert {n: v[0] for n, v in native.items()} == {n: v[0] for n, v in docker.items()}
    assert {n: (native[n][1], docker[n][1]) for n in native
            if native[n][1] != docker[n][1]} == BACKEND_REASONS
    # the image's setuid-root newgrp is there, and gives no root on either backend
    assert native["setuid-binary"] == docker["setuid-binary"] == (suite.CONTAINED, "ok")
