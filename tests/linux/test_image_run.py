"""Sandboxes whose root filesystem is an image (spec.image, `corral run --image`): the
overlay of the store's layers, ownership through the id map, nosuid, read-only root, the
layers held while the sandbox runs. Images are built with tarfile (test_image_builder) from
a few host programs copied to the image's own /usr and /lib."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from corral.runtime.cli import main
from corral.sandbox import Sandbox, SandboxSpec
from corral.sandbox.images.store import ImageStore

from ..unit.test_image_builder import Layer, digest, write_oci

PROGRAMS = ("/bin/dash", "/usr/bin/cat", "/usr/bin/stat", "/usr/bin/id", "/usr/bin/ls",
            "/usr/bin/touch", "/usr/bin/env", "/usr/bin/pwd")


def _libraries() -> set[str]:
    out = subprocess.run(["ldd", *PROGRAMS], capture_output=True, text=True).stdout
    libs = set()
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/") and os.path.exists(word):
                libs.add(word)
    return libs


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tools_layer() -> Layer:
    """A minimal userland from host files, at the image's paths (no apt, no os-release)."""
    layer = Layer().dir("usr").dir("usr/bin").dir("bin").dir("lib").dir("lib64")
    layer.dir("lib/x86_64-linux-gnu").dir("etc")
    for prog in PROGRAMS:
        name = "bin/sh" if prog == "/bin/dash" else "usr/bin/" + os.path.basename(prog)
        layer.file(name, _read(prog), mode=0o755)
    for lib in sorted(_libraries()):
        real = os.path.realpath(lib)
        target = lib.lstrip("/")
        if target.startswith("usr/lib/"):
            target = target[4:]
        layer.file(target, _read(real), mode=0o755)
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                             b"app:x:1000:1001:app:/home/app:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\napp:x:1001:\n")
    return layer


PYTHON = os.path.realpath("/usr/bin/python3")
PYLIB = "/usr/lib/python" + os.path.basename(PYTHON)[len("python"):]


def python_layer() -> Layer:
    """The host's Python binary and the few stdlib files its -I -S start needs, installed
    at /opt/py (a prefix the host does not have): a Python that is the image's."""
    ver = os.path.basename(PYLIB)
    layer = Layer().dir("opt").dir("opt/py").dir("opt/py/bin").dir("opt/py/lib")
    layer.dir(f"opt/py/lib/{ver}").dir(f"opt/py/lib/{ver}/encodings")
    layer.dir(f"opt/py/lib/{ver}/importlib")
    layer.dir(f"opt/py/lib/{ver}/lib-dynload")  # the exec_prefix landmark
    layer.file("opt/py/bin/python3", _read(PYTHON), mode=0o755)
    names = ["os.py", "abc.py", "codecs.py", "io.py", "zipimport.py",
             "importlib/__init__.py", "importlib/_bootstrap_external.py"]
    names += ["encodings/" + n for n in sorted(os.listdir(PYLIB + "/encodings"))
              if n.endswith(".py")]
    for name in names:
        layer.file(f"opt/py/lib/{ver}/{name}", _read(f"{PYLIB}/{name}"))
    out = subprocess.run(["ldd", PYTHON], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("/lib/x86_64-linux-gnu/") and word.split("/")[-1] not in (
                "libc.so.6",):
            layer.file(word.lstrip("/"), _read(os.path.realpath(word)), mode=0o755)
    return layer


def app_layer() -> Layer:
    return (Layer()
            .file("image-only-file", b"from the image\n")
            .dir("home", mode=0o755).dir("home/app", mode=0o755, uid=1000, gid=1001)
            .file("home/app/owned", b"mine\n", uid=1000, gid=1001)
            .file("usr/bin/suid-id", _read("/usr/bin/id"), mode=0o4755)
            .file("gone", b"deleted above\n"))


def top_layer() -> Layer:
    return Layer(compress=False).whiteout("gone")


@pytest.fixture
def image(tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", store)
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer(), top_layer()])
    ImageStore(store).pull(ref)
    return ref


def _run(sandbox: Sandbox, script: str) -> tuple[int, str, str]:
    proc = sandbox.exec(["/bin/sh", "-c", script])
    out, err = proc.communicate()
    return proc.wait(), out.decode(), err.decode()


def test_root_is_the_image(image):
    with Sandbox(SandboxSpec(image=image)) as sb:
        assert _run(sb, "cat /image-only-file") == (0, "from the image\n", "")
        # host-only files are not there: no apt, no os-release, no python
        code, out, _ = _run(sb, "ls /usr/bin/apt /etc/os-release /usr/bin/python3; echo $?")
        assert out == "2\n"
        assert _run(sb, "cat /gone")[0] == 1  # whited out by the top layer
        assert _run(sb, "cat /etc/hostname") == (0, "corral\n", "")


def test_a_python_of_the_image_runs_from_its_own_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), python_layer()])
    ImageStore().pull(ref)
    assert not os.path.exists("/opt/py")  # not the host's
    with Sandbox(SandboxSpec(image=ref)) as sb:
        proc = sb.exec(["/opt/py/bin/python3", "-I", "-S", "-c",
                        "import sys; print(sys.prefix, sys.executable)"])
        assert proc.communicate() == (b"/opt/py /opt/py/bin/python3\n", b"")
        assert _run(sb, "ls /usr/bin/python3; echo $?") == (
            0, "2\n", "ls: cannot access '/usr/bin/python3': No such file or directory\n")


def test_image_ownership_shows_through_the_id_map(image):
    with Sandbox(SandboxSpec(image=image)) as sb:
        assert _run(sb, "stat -c %u:%g /home/app/owned /image-only-file") == (
            0, "1000:1001\n0:0\n", "")


def test_root_is_read_only_and_scratch_is_writable(image):
    with Sandbox(SandboxSpec(image=image)) as sb:
        code, out, err = _run(sb, "touch /new-file")
        assert code == 1
        assert err == "touch: cannot touch '/new-file': Read-only file system\n"
        assert _run(sb, "touch /tmp/a /workspace/b && ls /tmp/a /workspace/b") == (
            0, "/tmp/a\n/workspace/b\n", "")


def test_setuid_binary_in_the_image_grants_nothing(image):
    with Sandbox(SandboxSpec(image=image)) as sb:
        assert _run(sb, "stat -c %a /usr/bin/suid-id") == (0, "4755\n", "")
        # uid 1000 inside runs the setuid-root id: nosuid keeps it 1000
        proc = sb.exec(["/usr/bin/suid-id", "-u"], user=(1000, 1001))
        out, err = proc.communicate()
        assert (proc.wait(), out, err) == (0, b"1000\n", b"")
        proc = sb.exec(["/usr/bin/id"], user=(1000, 1001))
        assert proc.communicate()[0] == b"uid=1000(app) gid=1001(app) groups=1001(app)\n"


def test_layers_are_held_while_the_sandbox_runs(image):
    store = ImageStore()
    with Sandbox(SandboxSpec(image=image)) as sb:
        freed = store.remove(image)
        assert freed.layers == []
        assert len(freed.in_use) == 3
        assert _run(sb, "cat /image-only-file") == (0, "from the image\n", "")
    assert len(store.prune().layers) == 3


def _config(layers: list[Layer], **config) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [digest(la.tar()) for la in layers]},
    }).encode()


def _cli_image(tmp_path, **config) -> str:
    layers = [tools_layer(), app_layer(), top_layer()]
    return write_oci(str(tmp_path / "cli-img"), layers, config=_config(layers, **config))


def _corral_run(argv: list[str], capfd) -> tuple[int, str, str]:
    code = main(["run", *argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_pulls_and_runs_a_command_on_the_image(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer(), top_layer()])
    assert _corral_run(["--image", ref, "--", "cat", "/image-only-file"], capfd) == (
        0, "from the image\n", "")
    assert [r.ref for r in ImageStore().images()] == [ImageStore().get(ref).ref]


def test_cli_runs_entrypoint_and_cmd_with_env_workdir_user(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    ref = _cli_image(tmp_path, Entrypoint=["/bin/sh", "-c", 'echo "$0 $IMAGE $KEEP $(pwd) '
                                                         '$(id -u):$(id -g)"'],
                     Cmd=["from-cmd"], Env=["PATH=/usr/bin:/bin", "IMAGE=img", "KEEP=img"],
                     WorkingDir="/home/app", User="app",
                     Volumes={"/data": {}}, ExposedPorts={"80/tcp": {}})
    note = ("corral: image config Volumes, ExposedPorts not honoured by corral run (see "
            "docs/images.md)\n")
    assert _corral_run(["--image", ref, "--env", "KEEP=spec"], capfd) == (
        0, "from-cmd img spec /home/app 1000:1001\n", note)
    # args after -- replace Cmd; the Entrypoint stays
    assert _corral_run(["--image", ref, "--", "from-args"], capfd) == (
        0, "from-args img img /home/app 1000:1001\n", note)


def test_cli_user_forms_and_unknown_user(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    for user, expected in (("1000", "1000:1001"), ("1000:5", "1000:5"), ("app:root", "1000:0"),
                           ("", "0:0")):
        ref = _cli_image(tmp_path / user.replace(":", "-"), User=user)
        assert _corral_run(["--image", ref, "--", "/bin/sh", "-c", "echo $(id -u):$(id -g)"],
                           capfd) == (0, expected + "\n", "")
    ref = _cli_image(tmp_path / "nouser", User="ghost")
    assert _corral_run(["--image", ref, "--", "id"], capfd) == (
        2, "", "corral: run: user: the image's User 'ghost': no user 'ghost' in its "
               "/etc/passwd\n")
    ref = _cli_image(tmp_path / "nocmd")
    assert _corral_run(["--image", ref], capfd) == (
        2, "", "corral: run: argv: no command given and the image has no Entrypoint or Cmd\n")


def test_no_leftovers_after_destroy(image):
    with open("/proc/self/mountinfo") as f:
        before = f.read()
    sb = Sandbox(SandboxSpec(image=image))
    sb.start()
    runtime_dir = sb.runtime_dir
    assert _run(sb, "cat /image-only-file")[0] == 0
    sb.destroy()
    with open("/proc/self/mountinfo") as f:
        assert f.read() == before
    assert not os.path.exists(runtime_dir)
    assert ImageStore().prune().in_use == []  # nothing held any more


def test_setup_failure_releases_the_layers(image, monkeypatch):
    from corral.sandbox.backends import native
    from corral.sandbox.errors import SandboxSetupError

    def refuse(self):
        raise SandboxSetupError("image overlay", self.spec.image, 22)

    monkeypatch.setattr(native.Sandbox, "_image_root", refuse)
    with pytest.raises(SandboxSetupError):
        Sandbox(SandboxSpec(image=image)).start()
    freed = ImageStore().remove(image)
    assert (freed.in_use, len(freed.layers)) == ([], 3)


def test_an_image_of_its_own_agent_helper_or_a_link_there_gets_corrals(tmp_path, monkeypatch):
    # images built from a Corral rootfs already hold /opt/corral/lib/corral_agent.py; one
    # may hold a link there instead: either way the sandbox sees Corral's helper, bound
    # read-only over a fresh mount point, and the link is not followed
    from corral.sandbox.contain import support_files

    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    (helper_path,) = support_files().values()
    ours = _read(helper_path)
    for name, layer in (
            ("file", Layer().dir("opt").dir("opt/corral").dir("opt/corral/lib")
             .file("opt/corral/lib/corral_agent.py", b"# the image's stale copy\n")),
            ("link", Layer().dir("opt").dir("opt/corral").dir("opt/corral/lib")
             .symlink("opt/corral/lib/corral_agent.py", "/etc/passwd"))):
        ref = write_oci(str(tmp_path / name), [tools_layer(), layer])
        ImageStore().pull(ref)
        with Sandbox(SandboxSpec(image=ref)) as sb:
            proc = sb.exec(["/usr/bin/cat", "/opt/corral/lib/corral_agent.py"])
            assert proc.communicate() == (ours, b""), name
            assert _run(sb, "cat /etc/passwd")[1].startswith("root:x:0:0:"), name
            assert _run(sb, "echo x > /opt/corral/lib/corral_agent.py")[0] != 0, name
