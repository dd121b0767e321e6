"""The command line (SPEC section 2). Errors are one line; exit 0 ok, 1 failed, 2 usage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from gateway import version
from gateway.config.describe import describe_routes
from gateway.config.loader import ACCESS_LOG_FORMS, load_config
from gateway.config.model import Config, ConfigError, parse_listen
from registry.core.models import SCHEMES
from registry.core.units import parse_duration

DEFAULT_ADMIN = "http://127.0.0.1:8081"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gateway: {message} (see {self.prog} --help)\n")


def _listen(value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(value: str) -> str:
    """A duration checked now (``--timeout abc`` is a usage error even without --wait)."""
    try:
        parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _workers(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"workers must be a positive integer, not {value!r}")
    return workers


ENVIRONMENT = """environment:
  GATEWAY_ADMIN_URL    the admin URL when --admin is not given
  GATEWAY_ADMIN_TOKEN  the bearer token when --token is not given (keeps it off the command line)
"""


def build_parser() -> argparse.ArgumentParser:
    """The commands users run (the worker's is apart: see build_worker_parser)."""
    parser = _Parser(
        prog="gateway",
        description="API gateway with a built-in service registry",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gateway {version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    run = commands.add_parser("run", help="run the gateway")
    _config_option(run)
    run.add_argument(
        "--listen", type=_listen, metavar="H:P", help="proxy listener (default: listen in --config)"
    )
    run.add_argument(
        "--admin-listen",
        type=_listen,
        metavar="H:P",
        help="admin listener (default: admin.listen in --config)",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes sharing the proxy port (default: %(default)s)",
    )
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="what to log from (default: %(default)s)",
    )
    run.add_argument(
        "--access-log",
        choices=ACCESS_LOG_FORMS,
        help="a line per request on stdout (default: proxy.access_log in --config, off)",
    )

    check = commands.add_parser("check", help="validate a config and print its routing table")
    _config_option(check)
    check.add_argument("file", nargs="?", metavar="FILE", help="the config file, as --config")

    services = commands.add_parser("services", help="list services and instances")
    services.add_argument("--service", metavar="NAME", help="only this service (default: all)")
    services.add_argument(
        "--json", action="store_true", help="print the registry API's JSON instead of a table"
    )
    _admin_options(services)

    register = commands.add_parser("register", help="register an instance and keep it alive")
    register.add_argument("service", help="service name, e.g. web")
    register.add_argument("address", metavar="HOST:PORT", help="where the instance listens")
    register.add_argument("--ttl", default="30s", help="lease length (default: %(default)s)")
    register.add_argument("--weight", help="share of traffic, 1..100 (default: 1)")
    register.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="instance metadata, e.g. version=1.4; repeatable (default: none)",
    )
    register.add_argument("--id", help="instance id (default: HOST:PORT)")
    register.add_argument(
        "--scheme", choices=SCHEMES, help="how the gateway talks to it (default: http)"
    )
    _admin_options(register)

    drain = commands.add_parser("drain", help="stop sending new requests to an instance")
    _instance_arguments(drain)
    drain.add_argument(
        "--wait", action="store_true", help="wait until its requests in flight have finished"
    )
    drain.add_argument(
        "--timeout", default="60s", type=_duration, help="longest --wait (default: %(default)s)"
    )
    _admin_options(drain)

    deregister = commands.add_parser("deregister", help="remove an instance from the registry")
    _instance_arguments(deregister)
    _admin_options(deregister)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", default="routes.yaml", help="config file (default: %(default)s)"
    )


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin listener (default: $GATEWAY_ADMIN_URL, else {DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "--token",
        help="admin bearer token (default: $GATEWAY_ADMIN_TOKEN; the variable keeps it "
        "out of ps and shell history)",
    )


def _instance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", help="service name, e.g. web")
    parser.add_argument("id", help="instance id, as `gateway services` lists it")


def build_worker_parser() -> argparse.ArgumentParser:
    """``gateway _worker``: how ``run --workers N`` starts its other processes. Apart from
    build_parser so that no usage, help or error message lists it."""
    worker = _Parser(prog="gateway _worker")
    worker.add_argument("--config", required=True)
    worker.add_argument("--listen", type=_listen, required=True)
    worker.add_argument("--feed-fd", type=int, required=True)
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--access-log", choices=ACCESS_LOG_FORMS)
    return worker


def admin_from(args: argparse.Namespace) -> tuple[str, str | None]:
    """The admin URL and token: the flags, else GATEWAY_ADMIN_URL and GATEWAY_ADMIN_TOKEN."""
    url = args.admin or os.environ.get("GATEWAY_ADMIN_URL") or DEFAULT_ADMIN
    return url, args.token or os.environ.get("GATEWAY_ADMIN_TOKEN") or None


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _log_to_stderr(level: str, tag: str) -> None:
    """Log lines on stderr, stamped in UTC as the API's times are: 2026-12-04T05:01:02.345Z."""
    handler = logging.StreamHandler()
    formatter = logging.Formatter(
        f"%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s{tag}: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway, StartupError, run

    _log_to_stderr(args.log_level, "")
    config = _load(args.config)
    if config is None:
        return 1
    try:
        gateway = Gateway(
            config,
            listen=args.listen,
            admin_listen=args.admin_listen,
            workers=args.workers,
            log_level=args.log_level,
            access_log=args.access_log,
        )
        run(gateway)
    except StartupError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway.app import run_loop
    from gateway.control.workers import run_worker

    _log_to_stderr(args.log_level, "[worker]")
    config = _load(args.config)
    if config is None:
        return 1
    run_loop(run_worker(config, args.listen, args.feed_fd, args.access_log))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate like ``run`` does (the same refusals), then print the routing table."""
    from gateway.config.describe import ignored_settings, plural, shadow_warnings
    from gateway.control.auth import open_admin_refusal, tokens_from

    path = args.file or args.config
    config = _load(path)
    if config is None:
        return 1
    tokens, _ = tokens_from(config.admin, os.environ)
    refusal = open_admin_refusal(config.admin, config.admin.listen, tokens, path)
    if refusal is not None:
        print(f"gateway: {refusal}", file=sys.stderr)
        return 1
    for line in describe_routes(config):
        print(line)
    for warning in [*shadow_warnings(config), *ignored_settings(config)]:
        print(warning, file=sys.stderr)
    print(f"{path}: ok, {plural(len(config.routes), 'route')}")
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from gateway.cli.registry import print_services

    return print_services(*admin_from(args), service=args.service, as_json=args.json)


def cmd_register(args: argparse.Namespace) -> int:
    from gateway.cli.registry import run_sidecar

    return run_sidecar(
        *admin_from(args),
        args.service,
        args.address,
        args.ttl,
        weight=args.weight,
        metadata=args.metadata,
        instance_id=args.id,
        scheme=args.scheme,
    )


def cmd_drain(args: argparse.Namespace) -> int:
    from gateway.cli.registry import drain

    timeout = args.timeout if args.wait else None
    return drain(*admin_from(args), args.service, args.id, wait_for=timeout)


def cmd_deregister(args: argparse.Namespace) -> int:
    from gateway.cli.registry import deregister

    return deregister(*admin_from(args), args.service, args.id)


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "services": cmd_services,
    "register": cmd_register,
    "drain": cmd_drain,
    "deregister": cmd_deregister,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_worker"]:
        return cmd_worker(build_worker_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
