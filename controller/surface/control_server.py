"""The head's control HTTP server: /healthz, /ready, /status, /metrics
(Prometheus text format) and POST /drain.

`/ready` is 200 only while requests can be served (see HeadNode.ready).

Bound to 127.0.0.1 by default; binding elsewhere is an explicit flag.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import web

from controller.logs import log
from controller.surface.metrics import CONTENT_TYPE
from states import State

class ControlServer:
    def __init__(
        self,
        host: str,
        port: int,
        state: Callable[[], State],
        ready: Callable[[], bool],
        status: Callable[[], Awaitable[dict[str, Any]]],
        request_drain: Callable[[str], None],
        metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._state = state
        self._ready = ready
        self._status = status
        self._request_drain = request_drain
        self._metrics = metrics
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/status", self.status)
        app.router.add_post("/drain", self.drain)
        if self._metrics is not None:
            app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        """Bind now, so a taken port is an error before anything else starts."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(f"control port {self.host}:{self.port} is not available: {exc.strerror or exc}") from None
        log.info("control_server_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True, "state": self._state().value})

    async def ready(self, request: web.Request) -> web.Response:
        state = self._state()
        ready = self._ready()
        return web.json_response({"ready": ready, "state": state.value}, status=200 if ready else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._status())

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def drain(self, request: web.Request) -> web.Response:
        self._request_drain("drain requested over the control API")
        return web.json_response({"draining": True, "state": self._state().value}, status=202)
