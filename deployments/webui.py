"""The web UI: one HTML page with its script and style, served by the Ingress from deployments/static/.

Plain HTML/JS/CSS with no CDN and no build step, so the page works offline. It talks to the same public API as any
client: `POST /v1/images/generations/stream` for images with a per-step progress bar, `GET /v1/fleet` for the fleet
view. Only the files present in static/ when the module loads are served, looked up by exact name, so no request
path can reach another file.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

from deployments.http import ApiError, api

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
STATIC_FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.suffix in _MEDIA_TYPES} \
    if STATIC_DIR.is_dir() else {}
# The page changes with the code; a short cache keeps a reload after an upgrade from showing the old script.
CACHE_CONTROL = "public, max-age=60"


class WebUi:
    """Mixed into Ingress: `GET /` is the page, `GET /static/<name>` its files."""

    @api.get("/", include_in_schema=False)
    async def index(self) -> FileResponse:
        return self._static_file("index.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        return self._static_file(name)

    @staticmethod
    def _static_file(name: str) -> FileResponse:
        path = STATIC_FILES.get(name)
        if path is None:
            raise ApiError(404, f"no static file {name!r}", "name", kind="not_found_error")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers={"Cache-Control": CACHE_CONTROL})
