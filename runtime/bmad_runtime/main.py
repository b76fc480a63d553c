"""Serve the agent runtime: uvicorn with `wiring.create_default_app` as the app factory.

This is what an agent pod runs (``bmad runtime``). uvicorn calls the factory, which
reads the settings, agent.json and the bindings; the app's lifespan then connects the
store, the authenticator and the limiter before the first request is served.

Before that, the garbage collector is set up for a server (`collector.tune`): what the
imports made is frozen and young collections are rarer.
"""

from __future__ import annotations

import logging
import os

import uvicorn

from bmad_runtime import collector, wiring
from bmad_runtime import settings as settings_mod

# uvicorn imports the factory by this name; the module is imported above, before the
# collector freezes what exists, so that what it imports is among what is frozen.
APP_FACTORY = f"{wiring.__name__}:create_default_app"


def run() -> None:
    level = os.environ.get("BMAD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_mod.load()
    collector.tune(settings.gc_young_threshold)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.http_host,
        port=settings.http_port,
        log_level=level.lower(),
        # Behind a kube Service, not a proxy whose headers could be trusted.
        proxy_headers=False,
        server_header=False,
        date_header=True,
        # Below terminationGracePeriodSeconds (30): in-flight answers may finish.
        timeout_graceful_shutdown=25,
        lifespan="on",
    )


if __name__ == "__main__":
    run()
