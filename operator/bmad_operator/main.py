"""Run the operator: `bmad operator run`."""

from __future__ import annotations

import asyncio
import logging

import kopf
from prometheus_client import start_http_server

from bmad_operator import handlers, profiling, settings


def run() -> None:
    cfg = settings.load()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf logs every handler call at INFO; keep its own lines to warnings.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    if cfg.tracemalloc_dir:
        profiling.start(cfg.tracemalloc_dir, frames=cfg.tracemalloc_frames)
    # httpx logs every request at INFO: one line per Prometheus query of every Agent.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr=cfg.bind_address)
    liveness = f"http://{cfg.bind_address}:{cfg.health_port}/healthz" if cfg.health_port else None
    memo = kopf.Memo(config=cfg)
    assert handlers.startup is not None  # registering the handlers is the import itself
    asyncio.run(
        kopf.operator(
            clusterwide=not cfg.namespace,
            namespaces=[cfg.namespace] if cfg.namespace else [],
            standalone=True,
            liveness_endpoint=liveness,
            memo=memo,
        )
    )
