"""The command line (SPEC section 2). Errors are one line; exit 0 ok, 1 failed, 2 usage."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from gateway.config.describe import describe_routes
from gateway.config.loader import ACCESS_LOG_FORMS, load_config
from gateway.config.model import Config, ConfigError, parse_listen

DEFAULT_ADMIN = "http://127.0.0.1:8081"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gateway: {message} (see gateway {self.prog.split()[-1]} --help)\n")


def _listen(value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"workers must be a positive integer, not {value!r}")
    return workers


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", description="API gateway with a built-in service registry")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="{run,check,services,register}"
    )

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", default="routes.yaml", help="config file (default ./routes.yaml)")
    run.add_argument("--listen", type=_listen, metavar="H:P", help="proxy listener")
    run.add_argument("--admin-listen", type=_listen, metavar="H:P", help="admin listener")
    run.add_argument("--workers", type=_workers, default=1, metavar="N")
    run.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], type=str.lower
    )
    run.add_argument(
        "--access-log",
        choices=ACCESS_LOG_FORMS,
        help="a line per request on stdout: json or common (default: proxy.access_log, off)",
    )

    check = commands.add_parser("check", help="validate a config and print its routing table")
    check.add_argument("--config", default="routes.yaml")

    services = commands.add_parser("services", help="list services and instances")
    services.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL")
    services.add_argument("--token", help="admin bearer token")

    register = commands.add_parser("register", help="register an instance and keep it alive")
    register.add_argument("service")
    register.add_argument("address", metavar="HOST:PORT")
    register.add_argument("--ttl", default="30s")
    register.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL")
    register.add_argument("--token", help="admin bearer token")
    worker = commands.add_parser("_worker")  # started by `run --workers N`, not by users
    worker.add_argument("--config", required=True)
    worker.add_argument("--listen", type=_listen, required=True)
    worker.add_argument("--feed-fd", type=int, required=True)
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--access-log", choices=ACCESS_LOG_FORMS)
    return parser


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
    from gateway.config.describe import ignored_settings, shadow_warnings

    config = _load(args.config)
    if config is None:
        return 1
    for line in describe_routes(config):
        print(line)
    for warning in [*shadow_warnings(config), *ignored_settings(config)]:
        print(warning, file=sys.stderr)
    print(f"{args.config}: ok, {len(config.routes)} routes")
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from gateway.cli.registry import print_services

    return print_services(args.admin, args.token)


def cmd_register(args: argparse.Namespace) -> int:
    from gateway.cli.registry import run_sidecar

    return run_sidecar(args.admin, args.token, args.service, args.address, args.ttl)


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "services": cmd_services,
    "register": cmd_register,
    "_worker": cmd_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
