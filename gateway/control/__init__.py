"""The control plane: admin API, metrics exposition, health checks, status page,
reload, worker processes. aiohttp lives here."""
