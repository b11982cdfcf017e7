"""The web playground's routes: `/playground` and its static files (`server/playground/`)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from server.errors import ErrorCode, not_found

router = APIRouter()

PLAYGROUND_FILES = {"index.html": "text/html; charset=utf-8",
                    "app.js": "text/javascript; charset=utf-8",
                    "heatmap.js": "text/javascript; charset=utf-8",
                    "style.css": "text/css; charset=utf-8"}


def _playground_file(name: str) -> bytes:
    return resources.files("server.playground").joinpath(name).read_bytes()


@router.get("/playground", include_in_schema=False)
async def playground() -> Response:
    return Response(_playground_file("index.html"), media_type=PLAYGROUND_FILES["index.html"],
                    headers={"Cache-Control": "no-cache"})


@router.get("/playground/", include_in_schema=False)
async def playground_slash() -> Any:
    return RedirectResponse("/playground")


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(name: str) -> Response:
    if name not in PLAYGROUND_FILES:
        raise not_found(f"no playground file {name!r}", None, ErrorCode.NOT_FOUND)
    return Response(_playground_file(name), media_type=PLAYGROUND_FILES[name],
                    headers={"Cache-Control": "no-cache"})
