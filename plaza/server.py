"""Running the plaza: one uvicorn process (uvloop, httptools), as the store runs one."""

from __future__ import annotations

from kernel.settings import Settings


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    """Serve the plaza until stopped (SIGTERM / SIGINT)."""
    import uvicorn

    from plaza.api import create_app

    config = uvicorn.Config(create_app(settings), loop="uvloop", http="httptools",
                            access_log=False, log_level=log_level, proxy_headers=False,
                            host=settings.plaza.host, port=settings.plaza.port)  # fmt: skip
    uvicorn.Server(config).run()
