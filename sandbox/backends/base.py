"""What every backend's sandbox shares: creating and started-on-entry lifecycle."""

from __future__ import annotations

from typing import Self


class SandboxLifecycle:
    """`create()` = construct + `start()`; `with` starts a new sandbox and destroys it on
    exit. Subclasses provide `state` ("new" until started), `start()` and `destroy()`."""

    state: str

    @classmethod
    def create(cls, spec=None, **kwargs) -> Self:
        sandbox = cls(spec, **kwargs)
        sandbox.start()
        return sandbox

    def __enter__(self) -> Self:
        if self.state == "new":
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def start(self) -> None:
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError
