"""The service registry: pure core, backends, HTTP API, client. Never imports gateway."""
