"""spec.image on a Docker engine: the REF forms the native backend takes (docs/images.md)
made an image the engine holds, and that image's config.

* a NAME the engine holds is used as it is;
* `docker-archive:FILE` is loaded as it is (`POST /images/load`), `oci:DIR[:TAG]` after
  rewriting the layout as a docker-archive (engines of API < 1.44 do not load OCI
  layouts): the layer blobs are copied unchanged, so the engine computes the same
  diff_ids and the image keeps its id, the config's digest. Either is then tagged
  `corral-image:<id>`, so the next sandbox on it finds it without loading again;
* a registry REF (`docker://...`, or HOST/REPO[:TAG] the engine does not hold) is pulled
  by the engine itself.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

from ...errors import CorralError
from .engine import _sdk

#: Repository of the images loaded from a file; the tag is the image id's hex.
LOADED_REPOSITORY = "corral-image"


def engine_image(api, url: str, ref: str) -> tuple[str, dict]:
    """(the engine's name of REF's image, its config: Entrypoint, Cmd, Env...), loading or
    pulling it first when the engine lacks it.

    Raises:
        ImageNotFound: no such file, layout, engine image or registry image.
        UnsupportedImage, LayerDigestMismatch: the source is unusable, or the engine's id
            of it is not the config's digest.
        CorralError: the engine refused the load or the pull.
    """
    from ...images.registry import looks_like_host

    if ref.startswith(("oci:", "docker-archive:")):
        name = _load_file(api, url, ref)
    elif ref.startswith("docker://") or (looks_like_host(ref.partition("/")[0])
                                         and "/" in ref and not _holds(api, ref)):
        name = _pull(api, url, ref)
    else:
        name = ref.removeprefix("docker-daemon:")
    return name, _config(api, url, name)


def _holds(api, name: str) -> bool:
    try:
        api.inspect_image(name)
    except _sdk().errors.ImageNotFound:
        return False
    return True


def _config(api, url: str, name: str) -> dict:
    """The image's config object as the engine reports it (None values left out)."""
    from ...images.errors import ImageNotFound

    docker = _sdk()
    try:
        info = api.inspect_image(name)
    except docker.errors.ImageNotFound:
        raise ImageNotFound(f"image {name!r} is not in the Docker engine at {url}") from None
    except docker.errors.APIError as exc:
        raise CorralError(f"docker: image {name!r}: {exc.explanation or exc}") from None
    return {k: v for k, v in (info.get("Config") or {}).items() if v is not None}


def _load_file(api, url: str, ref: str) -> str:
    """The tag of an oci:/docker-archive: image, loaded into the engine unless it is."""
    from ...images.errors import LayerDigestMismatch
    from ...images.sources import open_source

    with tempfile.TemporaryDirectory(prefix="corral-engine-image.") as scratch, \
            open_source(ref, scratch=scratch) as src:
        tag = src.config_digest.removeprefix("sha256:")
        name = f"{LOADED_REPOSITORY}:{tag}"
        if not _holds(api, name):
            if ref.startswith("docker-archive:"):
                with open(ref[len("docker-archive:"):], "rb") as archive:
                    _post_load(api, url, ref, archive)
            else:
                path = os.path.join(scratch, "image.tar")
                with open(path, "w+b") as archive:
                    write_docker_archive(src, archive)
                    archive.seek(0)
                    _post_load(api, url, ref, archive)
            try:
                api.tag(src.config_digest, LOADED_REPOSITORY, tag)
            except _sdk().errors.APIError as exc:
                raise CorralError(f"docker: {ref}: the engine did not load image "
                                  f"{src.config_digest} ({exc.explanation or exc})") from None
        got = api.inspect_image(name)["Id"]
        if got != src.config_digest:
            raise LayerDigestMismatch(f"{ref}: the engine's image {name} is {got}, not "
                                      f"{src.config_digest}")
        return name


def write_docker_archive(src, out) -> None:
    """The `docker save` form of an ImageSource: manifest.json, the config, and each layer
    blob as it is (gzip or plain: the engine inflates it and checks its diff_id)."""
    config_name = src.config_digest.removeprefix("sha256:") + ".json"
    layer_names = [f"{i}/layer.tar" for i in range(len(src.layers))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": None,
                            "Layers": layer_names}]).encode()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("manifest.json", manifest), (config_name, src.config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, layer in zip(layer_names, src.layers, strict=True):
            with layer.open() as blob:
                info = tarfile.TarInfo(name)
                info.size = os.fstat(blob.fileno()).st_size
                tar.addfile(info, blob)


def _post_load(api, url: str, ref: str, archive) -> None:
    """POST the archive to /images/load; the engine's error, if any, as a CorralError."""
    docker = _sdk()
    try:
        for message in api.load_image(archive):
            if isinstance(message, dict) and message.get("error"):
                raise CorralError(f"docker: loading {ref} into {url}: {message['error']}")
    except docker.errors.APIError as exc:
        raise CorralError(f"docker: loading {ref} into {url}: "
                          f"{exc.explanation or exc}") from None


def _pull(api, url: str, ref: str) -> str:
    """A registry image pulled by the engine; its HOST/REPO[:TAG|@DIGEST] name."""
    from ...images.errors import ImageNotFound
    from ...images.registry import parse_registry_ref

    rref = parse_registry_ref(ref.removeprefix("docker://"))
    repository = f"{rref.host}/{rref.repository}"
    docker = _sdk()
    try:
        for message in api.pull(repository, tag=rref.digest or rref.tag, stream=True,
                                decode=True):
            if message.get("error"):  # "not found", "manifest unknown", or unreachable
                error = message["error"]
                absent = "not found" in error or "manifest unknown" in error
                raise (ImageNotFound if absent else CorralError)(
                    f"image {rref}: the engine at {url} could not pull it: {error}")
    except docker.errors.NotFound as exc:
        raise ImageNotFound(f"image {rref}: the engine at {url} could not pull it: "
                            f"{exc.explanation or exc}") from None
    except docker.errors.APIError as exc:
        raise CorralError(f"docker: pulling {rref} at {url}: {exc.explanation or exc}") \
            from None
    return str(rref)
