"""Model work the engine runs between two steps (`Engine.call`): the function and where its
result goes (the caller's event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from steering.models.loading import LoadedModel


@dataclass
class ModelCall:
    """A function to run on the engine thread (`Engine.call`) and where its result goes."""

    fn: Callable[[LoadedModel], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any, error: BaseException | None) -> None:
        def done() -> None:
            if self.future.done():  # the caller gave up waiting
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(done)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
