"""`GET /v1/models`: the served model and its presets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from server.api.protocol.base import Applied


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steering-server"
    root: str | None = None
    context_length: int | None = None
    steering: Applied | None = None
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
