"""The engine in a thread of this process: the worker's messages are direct calls, no frames.

For tests of the engine alone and for the distributed mode, where rank 0's signals and its
process's end are tied to the HTTP process (LAYOUT.md 4.3).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import StartupError
from ..models.loader import LoadedModel
from .client import EngineClient
from .distributed.group import Group
from .front import shared_front_model
from .host import EngineHost
from .messages import EngineFailed, EngineOptions, FromEngine, Ready, ToEngine


class LocalTransport:
    def __init__(
        self,
        load: Callable[[], LoadedModel],
        options: EngineOptions,
        group: Group | None = None,
    ) -> None:
        self._load = load
        self._options = options
        self._group = group
        self._host: EngineHost | None = None

    def start(self, deliver: Callable[[FromEngine], None]) -> None:
        self._host = EngineHost(self._load, self._options, deliver, self._group)
        try:
            info = self._host.start()
        except StartupError as exc:
            deliver(EngineFailed(str(exc)))
            return
        deliver(Ready(info))

    @property
    def loaded(self) -> LoadedModel:
        """The model the worker holds (the front of this transport may share its tokenizer)."""
        if self._host is None or self._host.loaded is None:
            raise RuntimeError("the engine has not started")
        return self._host.loaded

    def send(self, message: ToEngine) -> None:
        if self._host is not None:
            self._host.handle(message)

    def stop(self, timeout_s: float) -> None:
        if self._host is not None:
            self._host.stop(timeout_s)

    def wait(self, timeout_s: float) -> bool:
        return self._host is None or self._host.wait(timeout_s)


def local_client(
    load: Callable[[], LoadedModel], options: EngineOptions, group: Group | None = None
) -> EngineClient:
    """A client of an engine in a thread of this process (not started yet)."""
    transport = LocalTransport(load, options, group)
    return EngineClient(transport, options, lambda _: shared_front_model(transport.loaded))
