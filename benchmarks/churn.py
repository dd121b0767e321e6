"""Churn soak: mixed load while instances register, deregister, drain, expire and die.

    python3 benchmarks/churn.py [--seconds 60] [--clients 8]

Runs a gateway in this process (uvloop when installed) with the driver of
tests/churn.py and prints the counts: requests, failures and their codes, stale
routings (traffic to an instance after it left: must be 0), and RSS before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from gateway.app import Gateway, run_loop  # noqa: E402
from gateway.config.loader import parse_config  # noqa: E402
from tests.churn import run_churn  # noqa: E402

CONFIG = """
proxy: {connect_timeout: 200ms, timeout: 2s}
routes:
  - prefix: /
    service: web
"""


async def main(seconds: float, clients: int) -> None:
    gateway = Gateway(parse_config(CONFIG), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0))
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            report = await run_churn(
                gateway,
                session,
                f"http://127.0.0.1:{gateway.admin_port}",
                f"http://127.0.0.1:{gateway.proxy_port}",
                seconds=seconds,
                clients=clients,
            )
    finally:
        await gateway.stop()
    result = dataclasses.asdict(report)
    codes = result.pop("failure_codes")
    result["failure_codes"] = {code: codes.count(code) for code in set(codes)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    run_loop(main(args.seconds, args.clients))
