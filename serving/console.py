"""The web console: the API docs (Swagger UI) and the profile inspector at /ui, served
from files installed with the package, never a CDN (most clusters reach no internet), and the
two reads the inspector needs besides the public API: a user's nearest items and the shards'
statistics.

`install(api)` adds the pages and their assets to the FastAPI app; the Ingress inherits
`ConsoleReads`, whose routes run on the replica (its fleet, recommender and tokens).
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.openapi.docs import (
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from actors.events import check_id
from persona.errors import ShardUnavailable
from serving import schemas
from serving.ranking import nearest_items
from serving.views import ApiError

# The inspector: plain HTML, JavaScript and CSS, no build step.
CONSOLE_FILES = Path(__file__).parent / "console_static"
# Swagger UI as released, shipped by the fastapi-offline package (MIT); only its asset files
# are used, the routes are ours. Its ReDoc is not served: ReDoc's sidebar loads its logo
# from a CDN, whatever the options.
DOCS_FILES = Path(str(resources.files("fastapi_offline") / "static"))
CONSOLE_ASSETS = "/ui/assets"
DOCS_ASSETS = "/docs/assets"

# Metric labels of the console's routes (serving.app.ENDPOINTS).
ENDPOINTS = {
    "swagger_ui": "docs",
    "swagger_ui_redirect": "docs",
    "console_page": "console",
    "get_nearest": "nearest",
    "get_shards": "shards",
}

router = APIRouter()


def install(api: FastAPI) -> None:
    """Serve the docs and the inspector from ``api``, which was made with
    ``docs_url=None, redoc_url=None`` (FastAPI's own pages load their scripts from a CDN)."""
    api.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_FILES), name="docs_assets")
    api.mount(CONSOLE_ASSETS, StaticFiles(directory=CONSOLE_FILES), name="console_assets")
    api.include_router(router)


def _root(request: Request) -> str:
    # Behind a route prefix or a proxy's root path, every URL the pages name moves with it.
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        oauth2_redirect_url=f"{root}{request.app.swagger_ui_oauth2_redirect_url}",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        # No badge that sends the schema to an online validator.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/oauth2-redirect", include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/ui", include_in_schema=False)
async def console_page(request: Request) -> HTMLResponse:
    page = (CONSOLE_FILES / "index.html").read_text()
    return HTMLResponse(page.replace("{{root}}", _root(request)))


class ConsoleReads:
    """The reads behind the inspector's panels, as routes of the Ingress (it inherits this
    class; Serve binds ``self`` to the replica). They follow the API's auth rules."""

    @router.get(
        "/v1/users/{user_id}/nearest",
        response_model=schemas.NearestOut,
        responses={404: {"model": schemas.ErrorBody, "description": "unknown user"}},
        tags=["profiles"],
    )
    async def get_nearest(
        self,
        user_id: str,
        k: int = Query(10, ge=1, le=100),
        authorization: str | None = Header(None),
    ) -> JSONResponse:
        """The items nearest to the user in each embedding space ranking uses. Needs
        what a profile read needs."""
        self.tokens.authorize(authorization, self.read_role)
        problem = check_id(user_id, "user_id")
        if problem:
            raise ApiError(422, "invalid_id", problem)
        record = await self._read_profiles(user_id)
        if record is None:
            raise ApiError(404, "unknown_user", f"no profile for user {user_id!r}")
        catalog = self.recommender.catalog
        found = await asyncio.to_thread(nearest_items, record, catalog, k)
        return JSONResponse(
            {
                "user_id": user_id,
                "model": catalog.model_version or None,
                "embedding": found["embedding"],
                "model_items": found["model"],
            }
        )

    @router.get("/v1/shards", response_model=schemas.ShardsOut, tags=["operations"])
    async def get_shards(self, authorization: str | None = Header(None)) -> dict:
        """Every shard the assignment names, with the statistics `persona status` prints.
        Like `/readyz`'s details: any known token (none when no token is configured)."""
        if self.tokens and self.tokens.identify(authorization) is None:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token> (any role)")
        try:
            await asyncio.wait_for(self.fleet.refresh_async(), timeout=5.0)
        except ShardUnavailable:
            pass  # the store answered; the shard that is not running is listed below
        except TimeoutError as exc:
            raise ApiError(503, "store_unavailable", "the assignment did not load") from exc

        async def stats(name: str) -> dict:
            handle = self.fleet.shards.get(name)
            if handle is None:
                return {"name": name, "state": "down: not running"}
            try:
                found = await asyncio.wait_for(handle.stats.remote(), timeout=5.0)
            except Exception as exc:  # any failure means "not answering"
                return {"name": name, "state": f"down: {type(exc).__name__}"}
            return {**found, "name": name, "state": "ok"}

        names = sorted(set(self.fleet.owners.values()) | set(self.fleet.shards))
        return {"shards": list(await asyncio.gather(*(stats(n) for n in names)))}
