"""registry.client against a fake admin: a ThreadingHTTPServer on port 0 in a thread.

The client is synchronous, so the fake runs in its own thread rather than on an event
loop; time passes only through a fake ``sleep``.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.cli.registry import (
    console_output,
    format_services,
    natural_key,
    print_services,
    run_sidecar,
    signals_as_keyboard_interrupt,
)
from registry.client.http import AdminClient, AdminError, AdminUnreachable
from registry.client.sidecar import Sidecar
from registry.core.models import format_address

Answer = tuple[int, Any]  # (status, JSON value | raw bytes | None for no body)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAdmin:
    """Records requests; answers from ``queued`` first, else like a tiny registry."""

    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    queued: list[Answer] = field(default_factory=list)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    busy_for: int = 0  # looks at a draining instance before its requests are done
    lock: threading.Lock = field(default_factory=threading.Lock)

    def queue(self, *answers: Answer) -> None:
        self.queued.extend(answers)

    def answer(self, seen: Seen) -> Answer:
        with self.lock:
            self.requests.append(seen)
            if self.queued:
                return self.queued.pop(0)
            return self._registry(seen)

    def _registry(self, seen: Seen) -> Answer:
        parts = seen.path.split("/")  # '', registry, services, NAME, instances, ID, heartbeat
        if seen.method == "POST":
            body = seen.body
            instance_id = body.get("id") or format_address(body["host"], body["port"])
            created = instance_id not in self.instances
            self.instances[instance_id] = {"id": instance_id, "host": body["host"]}
            answer = {**self.instances[instance_id], "ttl": 30, "heartbeat_interval": 10}
            return (201 if created else 200), answer
        if seen.method == "GET" and len(parts) == 4:
            listed = [i for i in list(self.instances.values()) if self._still_busy(i)]
            return 200, {"name": parts[3], "instances": listed}
        known = len(parts) > 5 and _unquote(parts[5]) in self.instances
        if not known:
            return 404, {"error": {"code": "unknown_instance", "message": "no such instance"}}
        instance_id = _unquote(parts[5])
        if seen.method == "PUT":
            return 200, {"id": instance_id, "ttl": 30, "heartbeat_interval": 10}
        if seen.method == "PATCH":
            self.instances[instance_id].update(seen.body)
            return 200, {**self.instances[instance_id], "in_flight": self.busy_for}
        del self.instances[instance_id]
        return 204, None

    def _still_busy(self, instance: dict[str, Any]) -> bool:
        """A draining instance marked deregister_when_idle is listed while ``busy_for``
        (looks at it) lasts, as if requests were in flight, then removed."""
        if not instance.get("deregister_when_idle"):
            return True
        if self.busy_for > 0:
            self.busy_for -= 1
            return True
        del self.instances[instance["id"]]
        return False

    def paths(self, method: str | None = None) -> list[str]:
        return [s.path for s in self.requests if method is None or s.method == method]


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


class _Server(ThreadingHTTPServer):
    fake: FakeAdmin


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        seen = Seen(self.command, self.path, dict(self.headers.items()), body)
        status, payload = self.server.fake.answer(seen)
        if payload is None:
            data, content_type = b"", "application/json"
        elif isinstance(payload, bytes):
            data, content_type = payload, "text/plain"
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the fake's access log out of capsys


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    fake = FakeAdmin()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def closed_url() -> str:
    """An address where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeSleep:
    """Records delays; ``hook(n, seconds)`` runs on the n-th call and may raise."""

    def __init__(self, hook: Callable[[int, float], None] | None = None) -> None:
        self.delays: list[float] = []
        self.hook = hook

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.hook is not None:
            self.hook(len(self.delays), seconds)


def interrupt_on(call: int) -> Callable[[int, float], None]:
    def hook(n: int, seconds: float) -> None:
        if n >= call:
            raise KeyboardInterrupt

    return hook


BODY = {"host": "127.0.0.1", "port": 9001, "ttl": "30s"}


def unauthorized() -> Answer:
    return 401, {"error": {"code": "unauthorized", "message": "missing or wrong bearer token"}}


# AdminClient


def test_register_sends_json_body_and_bearer_token(admin: FakeAdmin) -> None:
    answer = AdminClient(admin.url, "s3cret").register("users", BODY)

    assert answer["id"] == "127.0.0.1:9001"
    (seen,) = admin.requests
    assert (seen.method, seen.path) == ("POST", "/registry/services/users/instances")
    assert seen.body == BODY
    assert seen.headers["Authorization"] == "Bearer s3cret"
    assert seen.headers["Content-Type"] == "application/json"


def test_no_authorization_header_without_token(admin: FakeAdmin) -> None:
    AdminClient(admin.url, None).register("users", BODY)

    assert "Authorization" not in admin.requests[0].headers


@pytest.mark.parametrize(
    ("instance_id", "encoded"),
    [("127.0.0.1:9001", "127.0.0.1%3A9001"), ("[::1]:9000", "%5B%3A%3A1%5D%3A9000")],
)
def test_instance_ids_are_percent_encoded(admin: FakeAdmin, instance_id: str, encoded: str) -> None:
    client = AdminClient(admin.url)
    admin.queue((200, {"id": instance_id}), (204, None))

    client.heartbeat("users", instance_id)
    client.deregister("users", instance_id)

    base = "/registry/services/users/instances/" + encoded
    assert admin.paths() == [base + "/heartbeat", base]
    assert [s.method for s in admin.requests] == ["PUT", "DELETE"]


def test_error_answer_gives_code_and_message(admin: FakeAdmin) -> None:
    admin.queue((400, {"error": {"code": "invalid_port", "message": "port must be 1..65535"}}))

    with pytest.raises(AdminError) as caught:
        AdminClient(admin.url).register("users", {**BODY, "port": 0})

    assert (caught.value.status, caught.value.code) == (400, "invalid_port")
    assert caught.value.message == "port must be 1..65535"


def test_non_json_error_falls_back_to_status_phrase(admin: FakeAdmin) -> None:
    admin.queue((502, b"<html>Bad Gateway from some proxy</html>\nmore"))

    with pytest.raises(AdminError) as caught:
        AdminClient(admin.url).services()

    assert (caught.value.status, caught.value.code) == (502, "bad_gateway")
    assert caught.value.message == "<html>Bad Gateway from some proxy</html>"


@pytest.mark.parametrize("body", [b"hello", b"[" * 100_000], ids=["text", "nested-too-deep"])
def test_non_json_success_is_an_invalid_response(admin: FakeAdmin, body: bytes) -> None:
    admin.queue((200, body))

    with pytest.raises(AdminError, match="invalid_response"):
        AdminClient(admin.url).services()


def test_error_nested_too_deep_falls_back_to_status_phrase(admin: FakeAdmin) -> None:
    admin.queue((503, b"[" * 100_000))

    with pytest.raises(AdminError) as caught:
        AdminClient(admin.url).services()

    assert (caught.value.status, caught.value.code) == (503, "service_unavailable")


def test_refused_connection_is_unreachable(closed_url: str) -> None:
    with pytest.raises(AdminUnreachable, match="^connection refused$"):
        AdminClient(closed_url).services()


def test_bare_host_port_admin_url_means_http() -> None:
    assert AdminClient("127.0.0.1:8081/").base_url == "http://127.0.0.1:8081"


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "http://", "://x"])
def test_invalid_admin_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="invalid admin URL"):
        AdminClient(url)


# Sidecar


@pytest.fixture
def printed() -> Iterator[None]:
    """The sidecar's log printed as `gateway register` prints it."""
    with console_output():
        yield


def test_as_a_library_the_sidecar_logs_and_prints_nothing(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.sidecar")
    admin.queue((201, {"id": "127.0.0.1:9001", "ttl": 30}), (503, None))
    sleep = FakeSleep(interrupt_on(2))

    assert Sidecar(AdminClient(admin.url), "users", BODY, sleep=sleep).run() == 0

    assert capsys.readouterr() == ("", "")
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "registry.sidecar"]
    assert logged[0] == (
        "INFO",
        "registered users/127.0.0.1:9001 (ttl 30s, heartbeat every 10s); Ctrl-C to deregister",
    )
    assert logged[1][0] == "WARNING" and logged[1][1].startswith("admin answered 503")
    assert logged[-1][0] == "INFO" and logged[-1][1].startswith("deregistered users/127.0.0.1:9001")


def test_sidecar_heartbeats_then_deregisters_on_ctrl_c(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    sleep = FakeSleep(interrupt_on(4))

    code = Sidecar(AdminClient(admin.url), "users", BODY, sleep=sleep).run()

    assert code == 0
    assert sleep.delays == [10, 10, 10, 10]
    instance = "/registry/services/users/instances/127.0.0.1%3A9001"
    assert admin.paths() == [
        "/registry/services/users/instances",
        instance + "/heartbeat",
        instance + "/heartbeat",
        instance + "/heartbeat",
        instance,
        "/registry/services/users",
    ]
    assert admin.requests[-2].method == "PATCH"  # drained; removed by the gateway once idle
    assert admin.requests[-2].body == {"state": "draining", "deregister_when_idle": True}
    assert admin.instances == {}
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "registered users/127.0.0.1:9001 (ttl 30s, heartbeat every 10s); Ctrl-C to deregister",
        "deregistered users/127.0.0.1:9001",
    ]


def test_stop_check_ends_the_loop_like_ctrl_c(admin: FakeAdmin) -> None:
    sleep = FakeSleep()

    code = Sidecar(
        AdminClient(admin.url), "users", BODY, sleep=sleep, stop=lambda: len(sleep.delays) >= 2
    ).run()

    assert code == 0
    assert [s.method for s in admin.requests] == ["POST", "PUT", "PATCH", "GET"]


def test_heartbeat_404_registers_again(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    def forget(n: int, seconds: float) -> None:
        if n == 2:
            admin.instances.clear()  # the lease ended on the admin's side
        if n == 3:
            raise KeyboardInterrupt

    code = Sidecar(AdminClient(admin.url), "users", BODY, sleep=FakeSleep(forget)).run()

    assert code == 0
    assert [s.method for s in admin.requests] == ["POST", "PUT", "PUT", "POST", "PATCH", "GET"]
    assert admin.requests[3].body == BODY
    out = capsys.readouterr().out
    assert "lease of users/127.0.0.1:9001 is gone (admin answered 404); registering again" in out
    assert "registered users/127.0.0.1:9001 again" in out


def test_unreachable_admin_backs_off_then_recovers(
    admin: FakeAdmin, closed_url: str, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    client = AdminClient(closed_url)

    def admin_comes_back(n: int, seconds: float) -> None:
        if n == 6:
            client.base_url = admin.url
        if n == 8:
            raise KeyboardInterrupt

    sleep = FakeSleep(admin_comes_back)
    code = Sidecar(client, "users", BODY, sleep=sleep).run()

    assert code == 0
    assert sleep.delays == [0.5, 1, 2, 4, 5, 5, 10, 10]
    assert [s.method for s in admin.requests] == ["POST", "PUT", "PATCH", "GET"]
    captured = capsys.readouterr()
    retries = captured.err.splitlines()
    assert len(retries) == 6
    assert retries[0] == (
        f"gateway: cannot reach admin at {closed_url}: connection refused; retrying in 0.5s"
    )
    assert "registered users/127.0.0.1:9001 (ttl 30s" in captured.out


def test_heartbeat_5xx_is_retried_and_backoff_stays_within_a_third_of_the_ttl(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    overloaded = (503, {"error": {"code": "overloaded", "message": "too busy"}})
    admin.queue(
        (201, {"id": "127.0.0.1:9001", "ttl": 3, "heartbeat_interval": 1}),
        overloaded,
        overloaded,
        overloaded,
        (200, {"id": "127.0.0.1:9001", "ttl": 3, "heartbeat_interval": 1}),
        (200, {"id": "127.0.0.1:9001", "state": "draining"}),
    )
    sleep = FakeSleep(interrupt_on(5))

    code = Sidecar(AdminClient(admin.url), "users", {**BODY, "ttl": "3s"}, sleep=sleep).run()

    assert code == 0
    assert sleep.delays == [1, 0.5, 1, 1, 1]
    assert [s.method for s in admin.requests] == [
        "POST",
        "PUT",
        "PUT",
        "PUT",
        "PUT",
        "PATCH",
        "GET",
    ]
    captured = capsys.readouterr()
    assert "gateway: admin answered 503 overloaded: too busy; retrying in 0.5s" in captured.err
    assert "admin reachable again; lease of users/127.0.0.1:9001 renewed" in captured.out
    assert captured.out.endswith("deregistered users/127.0.0.1:9001\n")


def test_first_registration_401_ends_with_the_error(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    admin.queue(unauthorized())
    sleep = FakeSleep()

    code = Sidecar(AdminClient(admin.url), "users", BODY, sleep=sleep).run()

    assert code == 1
    assert sleep.delays == []
    assert [s.method for s in admin.requests] == ["POST"]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "gateway: cannot register users/127.0.0.1:9001: admin answered 401 unauthorized: "
        "missing or wrong bearer token — pass --token"
    ]


def test_deregister_404_counts_as_done(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    def expire_then_interrupt(n: int, seconds: float) -> None:
        admin.instances.clear()
        raise KeyboardInterrupt

    code = Sidecar(
        AdminClient(admin.url), "users", BODY, sleep=FakeSleep(expire_then_interrupt)
    ).run()

    assert code == 0
    assert "deregistered users/127.0.0.1:9001" in capsys.readouterr().out


def test_failed_deregistration_says_the_lease_will_end(
    admin: FakeAdmin, closed_url: str, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    client = AdminClient(admin.url)

    def admin_goes_away(n: int, seconds: float) -> None:
        client.base_url = closed_url
        raise KeyboardInterrupt

    code = Sidecar(client, "users", BODY, sleep=FakeSleep(admin_goes_away)).run()

    assert code == 1
    assert capsys.readouterr().err == (
        "gateway: could not deregister users/127.0.0.1:9001: cannot reach admin at "
        f"{closed_url}: connection refused; its lease ends within 30s\n"
    )


def interrupt_once_on(call: int) -> Callable[[int, float], None]:
    def hook(n: int, seconds: float) -> None:
        if n == call:
            raise KeyboardInterrupt

    return hook


def test_leaving_waits_until_the_gateway_has_no_request_in_flight(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    admin.busy_for = 3  # three looks at the draining instance before its requests are done
    sleep = FakeSleep(interrupt_once_on(2))

    assert Sidecar(AdminClient(admin.url), "users", BODY, sleep=sleep).run() == 0

    assert sleep.delays == [10, 10, 0.1, 0.1, 0.1]
    assert [s.method for s in admin.requests] == ["POST", "PUT", "PATCH"] + ["GET"] * 4
    assert admin.instances == {}
    assert capsys.readouterr().out.splitlines()[1:] == [
        "draining users/127.0.0.1:9001: waiting for its requests in flight",
        "deregistered users/127.0.0.1:9001",
    ]


def test_draining_longer_than_drain_timeout_deregisters_anyway(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    admin.busy_for = 1000  # a request that never ends
    sleep = FakeSleep(interrupt_once_on(1))
    sidecar = Sidecar(AdminClient(admin.url), "users", BODY, sleep=sleep, drain_timeout=0.3)

    assert sidecar.run() == 0

    assert [s.method for s in admin.requests][-2:] == ["GET", "DELETE"]
    assert sleep.delays == [10, 0.1, 0.1, 0.1]
    assert admin.instances == {}
    assert capsys.readouterr().err == (
        "gateway: deregistered users/127.0.0.1:9001 with requests still in flight after 0.3s\n"
    )


def test_a_second_ctrl_c_while_draining_deregisters_at_once(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], printed: None
) -> None:
    admin.busy_for = 1000
    sleep = FakeSleep(interrupt_on(1))  # the first poll's wait is interrupted too

    assert Sidecar(AdminClient(admin.url), "users", BODY, sleep=sleep).run() == 0

    assert [s.method for s in admin.requests] == ["POST", "PATCH", "GET", "DELETE"]
    assert admin.instances == {}
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "interrupted while draining users/127.0.0.1:9001: deregistering now",
        "deregistered users/127.0.0.1:9001",
    ]


def test_a_sidecar_thread_leaves_when_the_service_says_so(admin: FakeAdmin) -> None:
    sidecar = Sidecar(AdminClient(admin.url), "users", BODY)  # real waits, 10 s heartbeats
    sidecar.start()
    sidecar.leave(timeout=10)  # does not wait for the next heartbeat to notice

    assert sidecar.code == 0
    assert [s.method for s in admin.requests] == ["POST", "PATCH", "GET"]
    assert admin.instances == {}


def test_ctrl_c_before_registering_exits_0(closed_url: str) -> None:
    sleep = FakeSleep(interrupt_on(1))

    assert Sidecar(AdminClient(closed_url), "users", BODY, sleep=sleep).run() == 0


# run_sidecar: the CLI entry


def test_run_sidecar_registers_and_deregisters(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_sidecar(
        admin.url, "t", "users", "[::1]:9000", "30s", sleep=FakeSleep(interrupt_on(1))
    )

    assert code == 0
    assert admin.requests[0].body == {"host": "::1", "port": 9000, "ttl": "30s"}
    assert admin.requests[-2].path == "/registry/services/users/instances/%5B%3A%3A1%5D%3A9000"
    assert "deregistered users/[::1]:9000" in capsys.readouterr().out


def test_run_sidecar_401_exits_1(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    admin.queue(unauthorized())

    assert run_sidecar(admin.url, None, "users", "127.0.0.1:9001", "30s") == 1
    assert "401 unauthorized: missing or wrong bearer token" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("service", "address", "ttl", "message"),
    [
        ("users", "127.0.0.1", "30s", "invalid address '127.0.0.1'"),
        ("users", "127.0.0.1:0", "30s", "port must be an integer in 1..65535"),
        ("users", "127.0.0.1:http", "30s", "invalid address"),
        ("users", ":9000", "30s", "not 0.0.0.0"),
        ("users", "::1:9000", "30s", "invalid address"),
        ("users", "127.0.0.1:9001", "soon", "invalid --ttl"),
        ("users", "127.0.0.1:9001", "500ms", "at least 1s"),
        ("Users!", "127.0.0.1:9001", "30s", "invalid service"),
    ],
)
def test_run_sidecar_bad_arguments_exit_2(
    closed_url: str,
    capsys: pytest.CaptureFixture[str],
    service: str,
    address: str,
    ttl: str,
    message: str,
) -> None:
    assert run_sidecar(closed_url, None, service, address, ttl, sleep=FakeSleep()) == 2
    err = capsys.readouterr().err
    assert err.startswith("gateway: ") and err.count("\n") == 1
    assert message in err


def test_run_sidecar_sends_weight_metadata_id_and_scheme(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_sidecar(
        admin.url,
        None,
        "users",
        "127.0.0.1:9000",
        "30s",
        weight="5",
        metadata=["version=1.4", "zone=a=b", "empty="],
        instance_id="users-1",
        scheme="https",
        sleep=FakeSleep(interrupt_on(1)),
    )

    assert code == 0
    assert admin.requests[0].body == {
        "host": "127.0.0.1",
        "port": 9000,
        "ttl": "30s",
        "weight": 5,
        "metadata": {"version": "1.4", "zone": "a=b", "empty": ""},
        "id": "users-1",
        "scheme": "https",
    }
    assert "registered users/users-1 (ttl 30s" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight": "0"}, "invalid --weight '0': weight must be an integer in 1..100"),
        ({"weight": "101"}, "invalid --weight '101': weight must be an integer in 1..100"),
        ({"weight": "heavy"}, "invalid --weight 'heavy': weight must be an integer in 1..100"),
        ({"weight": "1.5"}, "invalid --weight '1.5': weight must be an integer in 1..100"),
        (
            {"metadata": ["version"]},
            "invalid --metadata 'version': use KEY=VALUE, e.g. version=1.4",
        ),
        ({"metadata": ["=1.4"]}, "invalid --metadata '=1.4': use KEY=VALUE, e.g. version=1.4"),
        ({"metadata": ["v=1", "v=2"]}, "invalid --metadata 'v=2': v is given twice"),
        (
            {"metadata": [f"k{n}=v" for n in range(65)]},
            "invalid --metadata: metadata must be an object of string to string, at most 64 keys",
        ),
        ({"instance_id": "a b"}, "invalid --id 'a b': id must match [A-Za-z0-9._:[]-]{1,128}"),
        ({"scheme": "ftp"}, "invalid --scheme 'ftp': scheme must be http or https"),
    ],
)
def test_run_sidecar_bad_options_exit_2_with_one_line(
    closed_url: str, capsys: pytest.CaptureFixture[str], options: dict[str, Any], message: str
) -> None:
    code = run_sidecar(closed_url, None, "users", "127.0.0.1:9001", "30s", **options)

    assert code == 2
    assert capsys.readouterr().err == f"gateway: {message}\n"


def test_sigterm_becomes_keyboard_interrupt_and_the_handler_is_restored() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    before = signal.getsignal(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt), signals_as_keyboard_interrupt():
        signal.raise_signal(signal.SIGTERM)

    assert signal.getsignal(signal.SIGTERM) == before


# gateway services


def test_print_services_lists_instances_and_empty_services(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    users = {
        "name": "users",
        "instances": [
            {
                "id": "[::1]:9000",
                "host": "::1",
                "port": 9000,
                "state": "draining",
                "health": "healthy",
                "weight": 3,
                "in_flight": 2,
                "expires_at": "2999-01-01T00:00:00.000Z",
            },
            {
                "id": "web-1",
                "host": "10.0.0.5",
                "port": 80,
                "state": "up",
                "health": "ejected",
                "weight": 1,
                "in_flight": 0,
                "expires_at": None,
            },
        ],
    }
    admin.queue(
        (200, {"services": [{"name": "users", "instances": 2, "healthy": 1}, {"name": "web"}]}),
        (200, users),
        (200, {"name": "web", "instances": []}),
    )

    assert print_services(admin.url, "t") == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "STATE",
        "HEALTH",
        "WEIGHT",
        "IN_FLIGHT",
        "EXPIRES",
    ]
    assert lines[1].split()[:7] == [
        "users",
        "[::1]:9000",
        "[::1]:9000",
        "draining",
        "healthy",
        "3",
        "2",
    ]
    assert lines[1].split()[7].endswith("s")
    assert lines[2].split() == [
        "users",
        "web-1",
        "10.0.0.5:80",
        "up",
        "ejected",
        "1",
        "0",
        "static",
    ]
    assert lines[3].split() == ["web", "-", "-", "-", "-", "-", "-", "-"]
    starts = [lines[0].index(title) for title in ("INSTANCE", "ADDRESS", "STATE", "EXPIRES")]
    for line in lines[1:4]:  # every cell starts under its title
        assert all(line[start - 1] == " " and line[start] != " " for start in starts)
    assert lines[4:] == [
        "",
        "users: 2 instances, 0 healthy, 1 ejected, 1 draining",  # as the API counts: routable
        "web: no instances",
    ]
    assert admin.paths() == [
        "/registry/services",
        "/registry/services/users",
        "/registry/services/web",
    ]
    assert all(s.headers["Authorization"] == "Bearer t" for s in admin.requests)


def test_format_services_sorts_naturally_and_shows_one_column_when_id_is_the_address() -> None:
    def instance(port: int, **fields: object) -> dict[str, object]:
        return {"id": f"127.0.0.1:{port}", "host": "127.0.0.1", "port": port, **fields}

    listing = [
        ("web-10", [instance(9010, health="healthy")]),
        ("web-2", [instance(900, health="failing"), instance(80, state="draining")]),
    ]

    lines = format_services(listing, 0.0)

    assert lines[0].split() == [
        "SERVICE", "INSTANCE", "STATE", "HEALTH", "WEIGHT", "IN_FLIGHT", "EXPIRES"
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["web-2", "127.0.0.1:80"],
        ["web-2", "127.0.0.1:900"],
        ["web-10", "127.0.0.1:9010"],
    ]
    assert lines[4:] == [
        "",
        "web-2: 2 instances, 0 healthy, 1 failing, 1 draining",
        "web-10: 1 instance, 1 healthy",
    ]


def test_format_services_says_why_an_instance_is_not_healthy() -> None:
    now = 1_700_000_000.0
    listing = [
        (
            "web",
            [
                {"id": "a", "host": "10.0.0.1", "port": 80, "health": "failing",
                 "health_reason": "status 503", "health_until": None},
                {"id": "b", "host": "10.0.0.2", "port": 80, "health": "ejected",
                 "health_reason": "5 connect failures or timeouts in a row",
                 "health_until": "2023-11-14T22:13:48.000Z"},
                {"id": "c", "host": "10.0.0.3", "port": 80, "health": "healthy",
                 "health_reason": None, "health_until": None},
            ],
        )
    ]  # fmt: skip

    lines = format_services(listing, now)

    assert lines[-3:] == [
        "web: 3 instances, 1 healthy, 1 ejected, 1 failing",
        "web/a failing: status 503",
        "web/b ejected (back in 28s): 5 connect failures or timeouts in a row",
    ]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["web-10", "web-2", "web-1"], ["web-1", "web-2", "web-10"]),
        (["a10b2", "a10b10", "a9"], ["a9", "a10b2", "a10b10"]),
        (
            ["10.0.0.10:80", "10.0.0.9:80", "10.0.0.9:8080"],
            ["10.0.0.9:80", "10.0.0.9:8080", "10.0.0.10:80"],
        ),
        (["b", "a", "7", "10"], ["7", "10", "a", "b"]),
    ],
)
def test_natural_key(names: list[str], expected: list[str]) -> None:
    assert sorted(names, key=natural_key) == expected


def test_format_services_expiry_is_seconds_from_now() -> None:
    instance = {"id": "a", "host": "h", "port": 1, "expires_at": "2024-01-01T00:00:30.000Z"}
    now = 1704067200.0  # 2024-01-01T00:00:00Z

    assert format_services([("s", [instance])], now)[1].endswith("30s")
    assert format_services([("s", [instance])], now + 31)[1].endswith("expired")
    assert format_services([], now) == ["no services registered"]


def test_print_services_refused_port_is_one_line(
    closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert print_services(closed_url, None) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"gateway: cannot reach admin at {closed_url}: connection refused\n"


def test_print_services_401_tells_to_pass_a_token(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    admin.queue(unauthorized())

    assert print_services(admin.url, None) == 1
    assert capsys.readouterr().err == (
        "gateway: admin answered 401 unauthorized: missing or wrong bearer token — pass --token\n"
    )
