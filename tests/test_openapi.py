"""GET /openapi.json, and schemathesis holding the admin listener to it.

A real `gateway run` (with a token, so the security the document declares is real)
answers requests that schemathesis generates from the document the gateway serves:
every status, header, content type and body must be one the document lists, schema-
invalid input must be refused with a 4xx, and no call may answer 5xx (503 aside, listed).
OPENAPI_EXAMPLES=300 runs more examples an operation than the suite's 20 (~35 s)."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi import checks  # noqa: E402

from registry.core.units import parse_duration  # noqa: E402
from tests.conftest import READY_LINE, REPO  # noqa: E402

TOKEN = "openapi-test-token"
ROUTES = """\
routes:
  - prefix: /api/
    service: api
admin:
  token_env: OPENAPI_TEST_TOKEN
registry:
  max_ttl: 10m
"""


@pytest.fixture(scope="module")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `gateway run` in a subprocess: schemathesis calls it synchronously."""
    cwd: Path = tmp_path_factory.mktemp("openapi")
    (cwd / "routes.yaml").write_text(ROUTES)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0"],
        cwd=cwd, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OPENAPI_TEST_TOKEN": TOKEN},
    )  # fmt: skip
    found: queue.Queue[re.Match[str] | None] = queue.Queue()
    # Read to the end, or the audit log would fill the pipe and stop the gateway.
    reader = threading.Thread(target=_read_log, args=(process, found), daemon=True)
    reader.start()
    try:
        ready = found.get(timeout=20)
        assert ready is not None, "gateway exited before listening"
        url = f"http://127.0.0.1:{ready.group(2)}"
        _register(url, {"host": "127.0.0.1", "port": 9000, "metadata": {"version": "1.4"}})
        yield url
    finally:
        process.kill()
        process.wait()
        reader.join()


def _read_log(process: subprocess.Popen[str], found: queue.Queue[re.Match[str] | None]) -> None:
    assert process.stderr is not None
    with process.stderr:
        for line in process.stderr:
            if ready := READY_LINE.search(line):
                found.put(ready)
    found.put(None)


def _register(admin_url: str, body: dict[str, object]) -> None:
    """An instance for the document's examples (service "api", id "127.0.0.1:9000") to find."""
    request = urllib.request.Request(
        f"{admin_url}/registry/services/api/instances",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


@pytest.fixture(scope="module")
def api_schema(admin_url: str) -> object:
    return schemathesis.openapi.from_url(f"{admin_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _waits_long(wait: object) -> bool:
    try:
        return parse_duration(wait) > 0.05
    except ValueError:
        return False  # refused: no wait at all


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("OPENAPI_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_answer_is_one_the_document_lists(case: object) -> None:
    # positive_data_acceptance is left out: a host can be well-formed and still refused
    # (the address policy: link-local, the gateway's own admin port), and a ttl string's
    # range is beyond a pattern.
    query = case.query  # type: ignore[attr-defined]
    if query and "index" in query and _waits_long(query.get("wait", "5m")):
        query["wait"] = "50ms"  # a long poll that nothing ends would hold the test for minutes
    # The token goes on every call but those whose point is a missing or broken one: put
    # back, it would make schemathesis expect a refusal of a request that is now valid.
    token = None if _mutates_authorization(case) else {"Authorization": f"Bearer {TOKEN}"}
    case.call_and_validate(  # type: ignore[attr-defined]
        headers=token,
        excluded_checks=[checks.positive_data_acceptance],
    )


def _mutates_authorization(case: object) -> bool:
    """A negative case that removed or changed the Authorization header."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_negative:
        return False
    data = meta.phase.data
    names = {getattr(data, "parameter", None)}
    names.update(getattr(m, "parameter", None) for m in getattr(data, "mutations", ()))
    return "Authorization" in names


async def test_the_document_follows_the_gateway(gateway_factory) -> None:
    """Without a token the registry operations declare no security; ttl's bound is max_ttl."""
    running = await gateway_factory("registry:\n  max_ttl: 2m\n")
    async with running.session.get(f"{running.admin_url}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()
    assert document["openapi"] == "3.1.0"
    assert "securitySchemes" not in document["components"]
    register = document["paths"]["/registry/services/{service}/instances"]["post"]
    assert "security" not in register and "401" not in register["responses"]
    ttl = document["components"]["schemas"]["RegisterBody"]["properties"]["ttl"]
    assert ttl["anyOf"][1]["maximum"] == 120
    listed = {(path, method) for path, item in document["paths"].items() for method in item}
    assert ("/registry/services/{service}/instances/{id}", "delete") in listed
    assert ("/openapi.json", "get") in listed
