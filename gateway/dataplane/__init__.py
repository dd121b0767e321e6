"""The data plane: client connections, exchanges, upstream pool, routing, wire rules.

Compiled with mypyc (setup.py). Imports asyncio and httptools, never aiohttp, yaml or
prometheus_client (tests/test_layering.py)."""
