"""Churn: load while instances register, deregister, drain, let leases expire and die.

Every failed request must be explained by an instance killed without
deregistering; none by stale routing (a deregistered, drained or expired instance
getting traffic). benchmarks/churn.py runs the same for longer and reports.
"""

from __future__ import annotations

from tests.churn import run_churn


async def test_ten_seconds_of_churn_fail_nothing_but_killed_instances(gateway_factory):
    gw = await gateway_factory(
        "proxy:\n  connect_timeout: 200ms\n  timeout: 2s\n"
        "routes:\n  - prefix: /\n    service: web\n"
    )
    report = await run_churn(gw.gateway, gw.session, gw.admin_url, gw.proxy_url, seconds=10)
    assert report.requests > 500
    assert report.stale == 0  # no request reached an instance after it left
    # A kill without deregistering may fail the POSTs in flight on it (in its handler, or
    # on the wire: at most one per client), nothing else; GETs go to another instance.
    assert report.failed <= report.in_flight_at_kills + 8 * report.kills
    assert set(report.failure_codes) <= {"upstream_protocol_error"}
    assert report.leaked_tasks == 0
