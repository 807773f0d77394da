"""Tests for pop3lite's OAuth2 section (token source, grants, token file) and its command line.

The pure parts first (PKCE, replies, errors, the token file); then end to end against
fakeserver's FakeOAuth2 authorization server, which issues the tokens its POP3 side accepts.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import pop3lite as m
from conftest import run_cli

SECRET = "client-Secret-42"


def state(**changes: Any) -> dict[str, Any]:
    """A token file's content as sign_in() writes it."""
    base: dict[str, Any] = {
        "format": "pop3lite-oauth2/1",
        "provider": "custom",
        "token_url": "http://127.0.0.1:9/token",
        "client_id": "pop3lite-test",
        "scope": "mail",
        "user": "alice",
        "grant": "device",
        "access_token": "Access-Token-1",
        "refresh_token": "Refresh-Token-1",
        "lifetime": 3600.0,
        "expires_at": time.time() + 3600,
    }
    base.update(changes)
    return base


def write_state(path: Path, content: dict[str, Any] | bytes, mode: int = 0o600) -> str:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


# ---- PKCE (RFC 7636) ------------------------------------------------------------------------


def test_pkce_challenge_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert m.pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_pkce_pair_is_random_unreserved_and_long_enough() -> None:
    verifier, challenge = m.pkce_pair()
    other, _ = m.pkce_pair()
    assert verifier != other
    assert 43 <= len(verifier) <= 128  # RFC 7636 section 4.1
    unreserved = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    assert set(verifier) <= set(unreserved)
    assert challenge == m.pkce_challenge(verifier) and "=" not in challenge


# ---- token endpoint replies (RFC 6749 section 5) --------------------------------------------


def test_a_json_reply_is_returned() -> None:
    reply = m._oauth2_reply(200, "application/json", b'{"access_token": "x"}', "the endpoint")
    assert reply == {"access_token": "x"}


@pytest.mark.parametrize(
    ("status", "kind", "body", "words"),
    [
        (200, "text/html", b"<html><body>Sign in</body></html>", "HTML page"),
        (200, "application/json", b"<!DOCTYPE html>", "HTML page"),
        (400, "text/plain", b"bad request", "no JSON"),
        (500, "application/json", b'{"error": "server_error"}', "HTTP 500"),
        (503, "text/html", b"", "HTTP 503"),
        (302, "text/html", b"", "HTTP 302"),
        (201, "application/json", b"{}", "without an error"),
    ],
    ids=["html", "html-as-json", "plain-text", "500", "503", "redirect", "odd-status"],
)
def test_replies_that_are_not_oauth2_are_endpoint_errors(
    status: int, kind: str, body: bytes, words: str
) -> None:
    with pytest.raises(m.OAuth2Error) as caught:
        m._oauth2_reply(status, kind, body, "the OAuth2 endpoint example")
    assert caught.value.reason == "endpoint"
    assert words in str(caught.value)


def test_a_provider_error_keeps_its_words_and_aadsts_code_whole() -> None:
    description = (
        "AADSTS700082: The refresh token has expired due to inactivity.\r\nThe token was "
        "issued on 2026-01-01 and was inactive for 90.00:00:00."
    )
    body = json.dumps(
        {"error": "invalid_grant", "error_description": description, "error_codes": [700082]}
    )
    with pytest.raises(m.OAuth2Error) as caught:
        m._oauth2_reply(400, "application/json", body.encode(), "the OAuth2 endpoint login")
    error = caught.value
    assert error.reason == "sign-in"
    assert error.error == "invalid_grant"
    assert error.description.startswith("AADSTS700082: The refresh token has expired")
    assert "\r" not in str(error) and "\n" not in str(error)
    assert "AADSTS700082" in str(error) and "sign in again" in str(error)


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        ("access_denied", "declined"),
        ("expired_token", "expired before"),
        ("invalid_client", "client id or secret"),
        ("unauthorized_client", "public client flows"),
        ("invalid_scope", "loopback grant"),
        ("something_new", "sign in again"),
    ],
)
def test_provider_errors_say_what_to_do(error: str, hint: str) -> None:
    exc = m._provider_error({"error": error}, "the OAuth2 endpoint x")
    assert exc.reason == "sign-in" and exc.error == error
    assert hint in str(exc)


@pytest.mark.parametrize("error", ["server_error", "temporarily_unavailable"])
def test_a_passing_provider_problem_is_an_endpoint_error(error: str) -> None:
    exc = m._provider_error({"error": error}, "the OAuth2 endpoint x")
    assert exc.reason == "endpoint" and "passing problem" in str(exc)
    status, line = m._failure(exc)
    assert status == 4 and line.count("try again later") == 1


def test_provider_text_is_made_printable_and_bounded() -> None:
    exc = m._provider_error(
        {"error": "invalid_grant\x1b[31m", "error_description": "x" * 5000}, "the endpoint"
    )
    assert "\x1b" not in str(exc)
    assert len(exc.description) == 500


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 3600.0), (3599, 3599.0), ("3599", 3599.0), (0.5, 0.5)],
)
def test_expires_in_accepts_numbers_and_numeric_strings(value: object, expected: float) -> None:
    assert m._reply_seconds(value, 3600.0, "the endpoint", "expires_in") == expected


@pytest.mark.parametrize("value", [-1, "soon", True, [], 1e12])
def test_expires_in_rejects_nonsense(value: object) -> None:
    with pytest.raises(m.OAuth2Error) as caught:
        m._reply_seconds(value, 3600.0, "the endpoint", "expires_in")
    assert caught.value.reason == "endpoint"


@pytest.mark.parametrize(
    "token", ["", "has space", "line\r\nend", "\x01", "é", "x" * (16 * 1024 + 1), 42, None]
)
def test_tokens_from_a_reply_are_checked(token: object) -> None:
    with pytest.raises(m.OAuth2Error) as caught:
        m._oauth2_token({"access_token": token}, "access_token", "the endpoint")
    assert "no usable access_token" in str(caught.value)
    if isinstance(token, str) and token:
        assert token not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://login.example.com/token",
        "http://localhost:8080/token",
        "ftp://127.0.0.1/token",
        "file:///etc/passwd",
        "https:///token",
    ],
)
def test_endpoints_need_https_or_loopback_http(url: str) -> None:
    with pytest.raises(ValueError, match="must be https://"):
        m.oauth2_post(url, {"grant_type": "refresh_token"})


def test_an_unreachable_endpoint_is_an_endpoint_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(m.OAuth2Error) as caught:
            m.oauth2_post(f"http://127.0.0.1:{port}/token", {"x": "y"}, timeout=5)
    assert caught.value.reason == "endpoint"
    assert "cannot reach the OAuth2 endpoint 127.0.0.1" in str(caught.value)


class RawEndpoint:
    """A token endpoint on 127.0.0.1 that answers one request with ``reply``, its bytes spaced
    ``gap`` seconds apart (a trickle), then hangs up."""

    def __init__(self, reply: bytes, gap: float = 0.0) -> None:
        import socket
        import threading

        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.listener.settimeout(TIMEOUT)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/token"
        self.stopped = threading.Event()
        self.request = b""
        self.thread = threading.Thread(target=self.serve, args=(reply, gap), daemon=True)
        self.thread.start()

    def serve(self, reply: bytes, gap: float) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(TIMEOUT)
            try:
                for _ in range(100):  # the request line and headers, then the form
                    self.request += connection.recv(65536)
                    head, end, body = self.request.partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: *(\d+)", head)
                    if end and len(body) >= (int(length.group(1)) if length else 0):
                        break
                pieces = [reply[i : i + 1] for i in range(len(reply))] if gap else [reply]
                for piece in pieces:
                    connection.sendall(piece)
                    if self.stopped.wait(gap):
                        return
            except OSError:
                return

    def __enter__(self) -> RawEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(TIMEOUT)


HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"


@pytest.mark.parametrize(
    "reply", [b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200, HEADERS + b" " * 200],
    ids=["headers", "body"],
)
def test_a_trickling_endpoint_is_cut_off_at_the_timeout(reply: bytes) -> None:
    with RawEndpoint(reply, gap=0.05) as endpoint:  # a byte every 50 ms: 10 s in all
        started = time.monotonic()
        with pytest.raises(m.OAuth2Error) as caught:
            m.oauth2_post(endpoint.url, {"grant_type": "refresh_token"}, timeout=1.0)
        assert time.monotonic() - started < 3
    assert caught.value.reason == "endpoint"
    assert "no complete reply within 1 s" in str(caught.value)


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (b"garbage\r\n\r\n", "BadStatusLine"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "HTTPException"),
        (HEADERS + b'{"access_token": ', "IncompleteRead"),
    ],
    ids=["status-line", "too-many-headers", "incomplete"],
)
def test_broken_http_is_an_endpoint_error(reply: bytes, words: str) -> None:
    with RawEndpoint(reply) as endpoint:
        with pytest.raises(m.OAuth2Error) as caught:
            m.oauth2_post(endpoint.url, {"grant_type": "refresh_token"}, timeout=TIMEOUT)
    assert caught.value.reason == "endpoint"
    assert f"sent broken HTTP ({words})" in str(caught.value)



# ---- provider presets and the token source's configuration ---------------------------------


def test_microsoft_preset_uses_common_tenant_and_pop_scope(tmp_path: Path) -> None:
    source = m.OAuth2(str(tmp_path / "t.json"), "microsoft", client_id="id")
    config = source._config
    assert config["token_url"] == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert config["device_url"].endswith("/common/oauth2/v2.0/devicecode")
    assert config["scope"] == "https://outlook.office.com/POP.AccessAsUser.All offline_access"
    assert config["grant"] == "device"
    other = m.OAuth2(str(tmp_path / "t.json"), "microsoft", client_id="id", tenant="contoso.com")
    assert other._config["auth_url"].startswith("https://login.microsoftonline.com/contoso.com/")


def test_google_preset_uses_mail_scope_and_the_loopback_grant(tmp_path: Path) -> None:
    config = m.OAuth2(str(tmp_path / "t.json"), "google", client_id="id")._config
    assert config["scope"] == "https://mail.google.com/"
    assert config["grant"] == "loopback"
    assert "device_url" not in config  # Google's device grant refuses the Gmail scope


def test_unknown_provider_and_grant_are_caller_mistakes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown OAuth2 provider 'yahoo'"):
        m.OAuth2(str(tmp_path / "t.json"), "yahoo")
    source = m.OAuth2(str(tmp_path / "t.json"), "microsoft", client_id="id")
    with pytest.raises(ValueError, match="unknown grant 'password'"):
        source.sign_in("alice", grant="password")
    with pytest.raises(ValueError, match="needs the client secret"):
        source.sign_in("alice", grant="client-credentials")
    with pytest.raises(ValueError, match="needs a provider or token_url"):
        m.OAuth2(str(tmp_path / "t.json")).sign_in("alice")
    assert not (tmp_path / "t.json").exists()


# ---- the token file -------------------------------------------------------------------------


def test_a_fresh_token_comes_from_the_file_without_a_request(tmp_path: Path) -> None:
    path = write_state(tmp_path / "t.json", state())  # its token URL has no server behind it
    source = m.OAuth2(path)
    assert source() == "Access-Token-1"
    assert source.user == "alice"


def test_the_token_file_is_written_0600_atomically(tmp_path: Path) -> None:
    path = str(tmp_path / "t.json")
    old_umask = os.umask(0)  # even a permissive umask gives 0600
    try:
        m._write_token_file(path, state())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(Path(path).read_text())["refresh_token"] == "Refresh-Token-1"
    assert os.listdir(tmp_path) == ["t.json"]  # no temporary file left behind


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_token_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_state(tmp_path / "t.json", state(), mode)
    with pytest.raises(m.OAuth2Error) as caught:
        m.OAuth2(path)()
    assert caught.value.reason == "permissions"
    assert f"mode {mode:03o}" in str(caught.value) and f"chmod 600 {path}" in str(caught.value)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode  # refused, not silently changed


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        json.dumps({"access_token": "x"}).encode(),
        json.dumps(state(format="other/1")).encode(),
        json.dumps(state(expires_at="tomorrow")).encode(),
        json.dumps(state(token_url=None)).encode(),
        b"\xff\xfe",
        json.dumps(state(access_token="Access\r\nDELE 1")).encode(),
        json.dumps(state(refresh_token=42)).encode(),
    ],
    ids=["empty", "broken", "list", "foreign", "format", "expiry", "url", "binary", "crlf",
         "refresh"],
)
def test_a_damaged_token_file_is_named_and_says_sign_in_again(
    tmp_path: Path, content: bytes
) -> None:
    path = write_state(tmp_path / "t.json", content)
    with pytest.raises(m.OAuth2Error) as caught:
        m.OAuth2(path)()
    assert caught.value.reason == "token-file"
    assert path in str(caught.value) and "sign in again" in str(caught.value)


def test_a_token_file_that_is_no_regular_file_is_named(tmp_path: Path) -> None:
    import threading

    directory = tmp_path / "dir.json"
    directory.mkdir()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def read(path: Path) -> None:
        try:
            m.OAuth2(str(path))()
        except BaseException as exc:  # noqa: BLE001 (inspected below)
            caught.append(exc)

    for path in (directory, fifo):
        reader = threading.Thread(target=read, args=(path,), daemon=True)
        reader.start()
        reader.join(5.0)
        assert not reader.is_alive(), "opening a FIFO blocked"
    assert [type(exc) for exc in caught] == [m.OAuth2Error, m.OAuth2Error]
    for exc, path in zip(caught, (directory, fifo)):
        assert isinstance(exc, m.OAuth2Error) and exc.reason == "token-file"
        assert f"token file {path} is not a regular file" in str(exc)


def test_a_missing_token_file_says_sign_in_first(tmp_path: Path) -> None:
    with pytest.raises(m.OAuth2Error) as caught:
        m.OAuth2(str(tmp_path / "none.json"))()
    assert caught.value.reason == "sign-in" and "sign in first" in str(caught.value)


def test_a_token_file_for_another_provider_is_refused(tmp_path: Path) -> None:
    path = write_state(tmp_path / "t.json", state(provider="microsoft"))
    with pytest.raises(m.OAuth2Error) as caught:
        m.OAuth2(path, "google", client_id="pop3lite-test")()
    assert caught.value.reason == "token-file"
    assert "made for provider 'microsoft', not 'google'" in str(caught.value)


def test_a_token_file_for_another_client_is_refused(tmp_path: Path) -> None:
    path = write_state(tmp_path / "t.json", state())
    with pytest.raises(m.OAuth2Error, match="made for client_id 'pop3lite-test', not 'other'"):
        m.OAuth2(path, client_id="other")()


def test_repr_and_errors_never_show_secrets(tmp_path: Path) -> None:
    path = write_state(tmp_path / "t.json", state(client_secret=SECRET))
    source = m.OAuth2(path, client_secret=SECRET)
    source()
    text = repr(source)
    assert "alice" in text and path in text
    for secret in ("Access-Token-1", "Refresh-Token-1", SECRET):
        assert secret not in text


def test_an_expiring_token_is_refreshed_under_the_lock(tmp_path: Path) -> None:
    # The refresh goes to a token URL nobody answers: the error proves a request was made,
    # and the file is left as it was.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/token"
        before = state(token_url=url, expires_at=time.time() + 30)  # within the margin
        path = write_state(tmp_path / "t.json", before)
        with pytest.raises(m.OAuth2Error) as caught:
            m.OAuth2(path, timeout=5)()
    assert caught.value.reason == "endpoint"
    assert json.loads(Path(path).read_text()) == before
    assert (tmp_path / "t.json.lock").exists()
    assert stat.S_IMODE(os.stat(tmp_path / "t.json.lock").st_mode) == 0o600


def test_a_short_lived_token_is_fresh_for_half_its_life(tmp_path: Path) -> None:
    # A 2-second token is not "always within a minute of expiry": the margin is at most half
    # its lifetime, so a run that has just refreshed uses the token it got.
    path = write_state(tmp_path / "t.json", state(lifetime=2.0, expires_at=time.time() + 1.9))
    assert m.OAuth2(path)() == "Access-Token-1"


def test_the_lock_wait_is_bounded(tmp_path: Path) -> None:
    import fcntl

    path = write_state(tmp_path / "t.json", state(expires_at=0))
    holder = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        lock = m._token_file_lock(path, 0.2)
        with pytest.raises(m.OAuth2Error) as caught:
            lock.__enter__()
    finally:
        os.close(holder)
    assert caught.value.reason == "busy"
    assert "in use by another process" in str(caught.value)
    status, line = m._failure(caught.value)
    assert status == m._EXIT["TEMPORARY"] and "sign in" not in line and "try again" in line


def test_a_store_that_fails_keeps_the_new_refresh_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_state(tmp_path / "t.json", state(expires_at=0))
    reply = {"access_token": "Access-2", "token_type": "mac", "refresh_token": "Refresh-2"}
    monkeypatch.setattr(m, "oauth2_post", lambda url, fields, timeout: dict(reply))
    with pytest.raises(m.OAuth2Error, match="not a bearer token"):
        m.OAuth2(path).refresh()
    assert json.loads(Path(path).read_text())["refresh_token"] == "Refresh-2"


def test_sign_in_takes_the_lock_before_asking_the_user(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    (tmp_path / "t.json.lock").mkdir()  # the lock cannot be taken
    asked: list[str] = []
    source = m.OAuth2(str(path), token_url="http://127.0.0.1:9/token", client_id="x",
                      device_url="http://127.0.0.1:9/devicecode")
    with pytest.raises(m.OAuth2Error) as caught:
        source.sign_in("alice", "device", lambda message, url: asked.append(url))
    assert caught.value.reason == "token-file" and "t.json.lock" in str(caught.value)
    assert asked == []


def opened_url(source: m.OAuth2) -> str:
    """The address sign_in() asks the user to open (the loopback grant; nobody comes back)."""
    shown: list[str] = []
    with pytest.raises(m.OAuth2Error, match="no browser came back"):
        source.sign_in("alice", "loopback", lambda message, url: shown.append(url), wait=0.1)
    return shown[0]


def test_google_asks_for_consent_so_that_a_second_sign_in_gets_a_refresh_token(
    tmp_path: Path,
) -> None:
    import urllib.parse

    url = opened_url(m.OAuth2(str(tmp_path / "t.json"), "google", client_id="x"))
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["access_type"] == "offline" and query["prompt"] == "consent"


def test_an_empty_scope_is_not_sent(tmp_path: Path) -> None:
    source = m.OAuth2(str(tmp_path / "t.json"), token_url="http://127.0.0.1:9/token",
                      auth_url="http://127.0.0.1:9/authorize", client_id="x")
    assert "scope" not in opened_url(source)
    with RawEndpoint(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") as endpoint:
        m.oauth2_post(endpoint.url, {"grant_type": "client_credentials", "scope": ""})
    assert b"grant_type=client_credentials" in endpoint.request
    assert b"scope" not in endpoint.request


def test_sign_in_needs_the_user_for_a_user_grant(tmp_path: Path) -> None:
    source = m.OAuth2(str(tmp_path / "t.json"), token_url="http://127.0.0.1:9/token",
                      auth_url="http://127.0.0.1:9/authorize", client_id="x")
    with pytest.raises(ValueError, match="needs the user"):
        source.sign_in("", "loopback", lambda message, url: None, wait=0.1)


# ---- the command line: secrets from commands ------------------------------------------------


@pytest.mark.usefixtures("cli_environment")
def test_password_command_gives_the_first_line(capsys: pytest.CaptureFixture[str]) -> None:
    from fakeserver import FakeServer

    with FakeServer() as server:
        where = f"{server.host}:{server.port}"
        command = "printf 'fugafuga\\r\\nsecond line\\n'; cat"  # cat ends: stdin is closed
        argv = [where, "hogehoge", "uidl", "-v", "--password-command", command]
        status, out, err = run_cli(capsys, *argv)
        assert status == 0, err
        assert "C: PASS ****" in err and "fugafuga" not in out + err
        status, _, err = run_cli(
            capsys, where, "hogehoge", "uidl", "--password-command", "printf wrong"
        )
    assert status == 3 and "(the password came from --password-command)" in err
    assert "wrong" not in err


@pytest.mark.usefixtures("cli_environment")
@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("exit 3", "failed (exit status 3)"),
        ("true", "printed nothing"),
        ("printf '\\n\\n'", "printed nothing"),
        ("sleep 30", "did not finish within 1 s"),
        ("printf '\\377\\n'", "is not UTF-8 text"),
    ],
    ids=["status", "silent", "blank", "timeout", "binary"],
)
def test_a_failing_password_command_is_named(
    capsys: pytest.CaptureFixture[str], command: str, words: str
) -> None:
    from fakeserver import FakeServer

    with FakeServer() as server:
        where = f"{server.host}:{server.port}"
        argv = [where, "hogehoge", "uidl", "--timeout", "1", "--password-command", command]
        status, _, err = run_cli(capsys, *argv)
        assert server.transcripts == []  # nothing was sent: the password came first
    assert status == 2
    assert f"--password-command {command!r}" in err and words in err


@pytest.mark.usefixtures("cli_environment")
def test_a_command_that_times_out_is_killed_with_its_children(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from conftest import wait_until

    pid_file = tmp_path / "child.pid"
    command = f"sleep 60 & echo $! > {pid_file}; wait"  # sh waits for a grandchild
    status, _, err = run_cli(
        capsys, "127.0.0.1:9", "alice", "--timeout", "1", "--password-command", command
    )
    assert status == 2 and "did not finish within 1 s" in err
    child = int(pid_file.read_text())

    def gone() -> bool:  # killed: a zombie until init reaps it, or gone
        try:
            return Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, 5.0)


@pytest.mark.usefixtures("cli_environment")
def test_oauth2_token_command(capsys: pytest.CaptureFixture[str]) -> None:
    from fakeserver import FakeServer

    with FakeServer("rfc") as server:
        where = f"{server.host}:{server.port}"
        argv = [where, "hogehoge", "--json", "--oauth2-token-command", "echo fake-oauth-token"]
        status, out, err = run_cli(capsys, *argv)
        assert status == 0, err
        assert json.loads(out)["auth"] == "OAUTHBEARER"
        argv[-1] = "echo another-token"
        status, _, err = run_cli(capsys, *argv)
    assert status == 3 and "the token came from --oauth2-token-command" in err
    assert "another-token" not in err and "--apop" not in err


@pytest.mark.usefixtures("cli_environment")
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--password-command", "x", "--oauth2", "f"], "--password-command and --oauth2: choose"),
        (["--password-file", "p", "--oauth2-token-command", "x"], "choose one"),
        (["oauth2", "--client-id", "x", "--provider", "microsoft"], "needs --oauth2 FILE"),
        (["oauth2", "--oauth2", "f", "--provider", "google"], "needs --client-id"),
        (["oauth2", "--oauth2", "f", "--client-id", "x"], "(or --token-url)"),
        (["check", "--grant", "device", "--oauth2", "f"], "--grant only goes with oauth2"),
        (["check", "--provider", "google"], "go with --oauth2 FILE"),
        (["--auth", "XOAUTH2"], "needs --oauth2 FILE"),
        (["--auth", "PLAIN", "--oauth2", "f"], "goes with --auth XOAUTH2 or OAUTHBEARER"),
    ],
)
def test_oauth2_option_mistakes(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    status, _, err = run_cli(capsys, "127.0.0.1:9", "alice", *argv)
    assert status == 2 and words in err


# ---- end to end against fakeserver's FakeOAuth2 ---------------------------------------------

USER = "hogehoge"  # the "rfc" preset's account
TIMEOUT = 5.0


def oauth_server(**options: Any) -> Any:
    """A POP3 server ("rfc" preset) with a FakeOAuth2 beside it, polled at 50 ms."""
    from fakeserver import FakeOAuth2, FakeServer

    options.setdefault("device_interval", 0.05)
    return FakeServer("rfc", oauth2=FakeOAuth2(**options))


def source_for(server: Any, path: Path, **options: Any) -> m.OAuth2:
    fake = server.oauth2
    return m.OAuth2(
        str(path),
        client_id=fake.client_id,
        token_url=fake.token_url,
        device_url=fake.device_url,
        auth_url=fake.auth_url,
        timeout=TIMEOUT,
        **options,
    )


def approve(server: Any) -> Any:
    """The user, in the device grant: approves the code on the verification page."""
    return lambda message, url: server.oauth2.approve()


def browse(server: Any, opened: list[str] | None = None) -> Any:
    """The user, in the loopback grant: opens the address in a browser and consents."""

    def user(message: str, url: str) -> None:
        if opened is not None:
            opened.append(url)
        server.oauth2.browse(url)

    return user


def sign_in(server: Any, path: Path, grant: str = "device") -> m.OAuth2:
    prompt = approve(server) if grant == "device" else browse(server)
    source_for(server, path).sign_in(USER, grant, prompt)
    return m.OAuth2(str(path), timeout=TIMEOUT)


def saved(path: Path) -> dict[str, Any]:
    content: dict[str, Any] = json.loads(path.read_text())
    return content


def log_in(server: Any, source: Any, user: str = USER) -> str:
    with m.POP3(server.host, server.port, timeout=TIMEOUT) as pop:
        pop.login_oauth2(user, source)
        return str(pop.stat().count)


def grants(server: Any) -> list[str]:
    """The grant of each successful token request, in order."""
    return [r.grant for r in server.oauth2.requests if r.path == "/token" and r.error is None]


def test_device_grant_signs_in_and_the_token_logs_in(tmp_path: Path) -> None:
    shown: list[tuple[str, str]] = []
    path = tmp_path / "t.json"
    with oauth_server() as server:

        def user(message: str, url: str) -> None:
            shown.append((message, url))
            server.oauth2.approve()

        source_for(server, path).sign_in(USER, prompt=user)
        assert log_in(server, m.OAuth2(str(path), timeout=TIMEOUT)) == "3"
        assert grants(server) == ["device_code"]
    (message, url), = shown
    assert url.startswith(server.oauth2.base_url) and url in message and "enter the code" in message
    content = saved(path)
    assert content["user"] == USER and content["grant"] == "device"
    assert content["token_url"] == server.oauth2.token_url and content["refresh_token"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_device_grant_polls_while_pending(tmp_path: Path) -> None:
    path = tmp_path / "config" / "pop3lite" / "t.json"  # directories made as needed, 0700
    with oauth_server(approve_after=3) as server:
        source_for(server, path).sign_in(USER, prompt=lambda message, url: None)
        polls = [r.error for r in server.oauth2.requests if r.grant == "device_code"]
    assert polls == ["authorization_pending"] * 3 + [None]
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700 and saved(path)["access_token"]


def test_device_grant_slows_down_when_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fakeserver import Fault

    monkeypatch.setattr(m, "SLOW_DOWN_STEP", 0.5)  # 5 s in the RFC; the logic is the same
    faults = [Fault("slow_down", times=1)]
    with oauth_server(approve_after=1, slow_down_step=0.5, faults=faults) as server:
        started = time.monotonic()
        source_for(server, tmp_path / "t.json").sign_in(USER, prompt=lambda message, url: None)
        waited = time.monotonic() - started
        polls = [r.error for r in server.oauth2.requests if r.grant == "device_code"]
    assert polls[-1] is None and any(error and "slow_down" in error for error in polls)
    assert waited >= 0.5 + 0.05 * len(polls)  # the step waited on top of each interval


@pytest.mark.parametrize(
    ("setup", "words"),
    [("deny", "access_denied"), ("expire", "expired")],
)
def test_device_grant_refused_or_expired(tmp_path: Path, setup: str, words: str) -> None:
    lifetime = 0.3 if setup == "expire" else 600.0
    with oauth_server(device_lifetime=lifetime) as server:
        source = source_for(server, tmp_path / "t.json")

        def user(message: str, url: str) -> None:
            if setup == "deny":
                server.oauth2.deny()

        with pytest.raises(m.OAuth2Error) as caught:
            source.sign_in(USER, prompt=user)
    assert caught.value.reason == "sign-in" and words in str(caught.value)
    assert "sign in again" in str(caught.value)
    assert not (tmp_path / "t.json").exists()


def test_device_grant_wait_is_bounded_by_the_caller(tmp_path: Path) -> None:
    with oauth_server() as server:  # nobody approves
        source = source_for(server, tmp_path / "t.json")
        with pytest.raises(m.OAuth2Error, match="expired before the sign-in was completed"):
            source.sign_in(USER, prompt=lambda message, url: None, wait=0.3)


def test_loopback_grant_with_pkce_signs_in(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    shown: list[str] = []
    with oauth_server() as server:
        source_for(server, path).sign_in(USER, "loopback", browse(server, shown))
        assert log_in(server, m.OAuth2(str(path), timeout=TIMEOUT)) == "3"
        assert grants(server) == ["authorization_code"]
    import urllib.parse

    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(shown[0]).query))
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"].startswith("http://127.0.0.1:") and query["state"]
    assert saved(path)["grant"] == "loopback"


def test_loopback_grant_declined_by_the_user(tmp_path: Path) -> None:
    with oauth_server() as server:
        source = source_for(server, tmp_path / "t.json")
        with pytest.raises(m.OAuth2Error) as caught:
            source.sign_in(USER, "loopback", lambda msg, url: server.oauth2.browse(url, deny=True))
    assert caught.value.reason == "sign-in" and "access_denied" in str(caught.value)


def test_loopback_listener_checks_state_and_its_wait_is_bounded() -> None:
    import http.client
    import urllib.parse

    def forged(redirect_uri: str) -> None:
        port = urllib.parse.urlsplit(redirect_uri).port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            connection.request("GET", "/favicon.ico")
            assert connection.getresponse().read() and True
            connection.request("GET", "/?code=stolen-code&state=guessed")
            reply = connection.getresponse()
            assert reply.status == 400 and b"stolen-code" not in reply.read()
        finally:
            connection.close()

    with pytest.raises(m.OAuth2Error) as caught:
        m._await_redirect("expected-state", forged, 5.0)
    assert "another state" in str(caught.value) and "stolen-code" not in str(caught.value)
    started = time.monotonic()
    with pytest.raises(m.OAuth2Error, match="no browser came back within"):
        m._await_redirect("expected-state", lambda uri: None, 0.2)
    assert time.monotonic() - started < 3


def test_loopback_redirect_error_keeps_the_providers_words_and_an_idle_connection_waits(
) -> None:
    import http.client
    import socket
    import urllib.parse

    def browser(redirect_uri: str) -> None:
        port = urllib.parse.urlsplit(redirect_uri).port
        with socket.create_connection(("127.0.0.1", port), TIMEOUT):  # an idle preconnect
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                query = "state=expected&error=access_denied&error_description=AADSTS65004%3A+no"
                connection.request("GET", "/?" + query)
                assert connection.getresponse().status == 200
            finally:
                connection.close()

    started = time.monotonic()
    with pytest.raises(m.OAuth2Error) as caught:
        m._await_redirect("expected", browser, 8.0)
    assert time.monotonic() - started < 5  # not held up by the idle connection (10 s)
    assert caught.value.error == "access_denied" and caught.value.reason == "sign-in"
    assert caught.value.description == "AADSTS65004: no"
    assert "AADSTS65004: no" in str(caught.value) and "declined" in str(caught.value)


def test_a_user_grant_without_a_refresh_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = m.OAuth2._token_request

    def without_refresh(self: m.OAuth2, state: Any, fields: Any) -> Any:
        reply = asked(self, state, fields)
        reply.pop("refresh_token", None)
        return reply

    monkeypatch.setattr(m.OAuth2, "_token_request", without_refresh)
    path = tmp_path / "t.json"
    with oauth_server() as server:
        with pytest.raises(m.OAuth2Error) as caught:
            source_for(server, path).sign_in(USER, "loopback", browse(server))
    assert caught.value.reason == "sign-in" and "sent no refresh token" in str(caught.value)
    assert not path.exists()


def test_client_credentials_grant(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with oauth_server(client_secret=SECRET) as server:
        source_for(server, path, client_secret=SECRET).sign_in(grant="client-credentials")
        assert log_in(server, m.OAuth2(str(path), timeout=TIMEOUT)) == "3"
        server.oauth2.expire_access_tokens()  # no refresh token: the grant is asked again
        assert log_in(server, m.OAuth2(str(path), timeout=TIMEOUT)) == "3"
        assert grants(server) == ["client_credentials", "client_credentials"]
        wrong = source_for(server, tmp_path / "u.json", client_secret="Wrong-Secret-7")
        with pytest.raises(m.OAuth2Error) as caught:
            wrong.sign_in(grant="client-credentials")
    assert caught.value.error == "invalid_client" and "Wrong-Secret-7" not in str(caught.value)
    content = saved(path)
    assert content["user"] == "" and content["client_secret"] == SECRET
    assert "refresh_token" not in content


def test_refresh_rotates_and_the_spent_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with oauth_server(access_lifetime=2.0) as server:
        source = sign_in(server, path)
        first = saved(path)
        assert source.refresh(first["access_token"]) != first["access_token"]
        second = saved(path)
        assert second["refresh_token"] != first["refresh_token"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(m.OAuth2Error) as caught:
            m.oauth2_post(
                server.oauth2.token_url,
                {"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
                 "client_id": server.oauth2.client_id},
            )
        assert caught.value.error == "invalid_grant"
        assert log_in(server, source) == "3"
    assert first["refresh_token"] not in str(caught.value)


def test_a_refused_token_is_refreshed_once_and_tried_once(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with oauth_server() as server:
        source = sign_in(server, path)
        server.oauth2.expire_access_tokens()  # still valid by its expiry, refused by POP3
        assert log_in(server, source) == "3"
        assert grants(server) == ["device_code", "refresh_token"]
        auths = [line for line in server.transcripts[-1] if line.startswith("C: AUTH")]
        assert len(auths) == 2
    with oauth_server(user="somebody-else") as server:  # issues tokens POP3 never accepts
        source = sign_in(server, path)
        with pytest.raises(m.AuthenticationError):
            log_in(server, source)
        assert grants(server) == ["device_code", "refresh_token"]  # one refresh, no more
        auths = [line for line in server.transcripts[-1] if line.startswith("C: AUTH")]
        assert len(auths) == 2


def test_a_token_file_for_another_account_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with oauth_server() as server:
        source = sign_in(server, path)
        with pytest.raises(m.OAuth2Error) as caught:
            log_in(server, source, user="alice")
        assert server.transcripts[-1] == [] or not any(
            line.startswith("C: AUTH") for line in server.transcripts[-1]
        )
    assert caught.value.reason == "token-file"
    assert f"made for '{USER}', not 'alice'" in str(caught.value)


def test_two_runs_at_once_spend_the_refresh_token_once(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "t.json"
    with oauth_server() as server:
        sign_in(server, path)
        content = saved(path)
        content["expires_at"] = 0  # both runs find it expired
        m._write_token_file(str(path), content)
        barrier = threading.Barrier(2, timeout=TIMEOUT)
        results: list[str] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                barrier.wait()
                results.append(m.OAuth2(str(path), timeout=TIMEOUT)())
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
        assert not errors and len(results) == 2
        assert results[0] == results[1] == saved(path)["access_token"]
        assert grants(server) == ["device_code", "refresh_token"]
        assert [r.error for r in server.oauth2.requests if r.grant == "refresh_token"] == [None]


# ---- end to end: the command line ------------------------------------------------------------


def cli_sign_in(server: Any, path: Path, *extra: str) -> list[str]:
    fake = server.oauth2
    return [
        f"{server.host}:{server.port}", USER, "oauth2", "--oauth2", str(path),
        "--client-id", fake.client_id, "--token-url", fake.token_url,
        "--device-url", fake.device_url, "--auth-url", fake.auth_url, "--timeout", "5", *extra,
    ]


def secrets_in(path: Path) -> list[str]:
    """The very tokens (and secret) the fake issued, as the token file holds them."""
    content = saved(path)
    return [content[key] for key in ("access_token", "refresh_token", "client_secret")
            if content.get(key)]


@pytest.mark.usefixtures("cli_environment")
def test_cli_device_sign_in_then_cron_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "alice.json"
    with oauth_server(access_lifetime=2.0, approve_after=1) as server:
        status, out, err = run_cli(capsys, *cli_sign_in(server, path))
        assert status == 0, err
        assert "To sign in, open " in err and "enter the code" in err
        assert f"check --oauth2 {path}" in err
        where = f"{server.host}:{server.port}"
        status, out, err = run_cli(capsys, where, USER, "uidl", "-v", "--oauth2", str(path))
        assert status == 0, err
        assert "C: AUTH OAUTHBEARER ****" in err or "C: AUTH XOAUTH2 ****" in err
        transcripts = "\n".join("\n".join(lines) for lines in server.transcripts)
    assert "C: AUTH" in transcripts
    for secret in secrets_in(path):
        assert secret not in out + err + transcripts


@pytest.mark.usefixtures("cli_environment")
def test_cli_loopback_sign_in(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gmail.json"
    opened: list[str] = []
    with oauth_server() as server:
        monkeypatch.setattr(m, "_show_sign_in", browse(server, opened))
        status, _, err = run_cli(capsys, *cli_sign_in(server, path, "--grant", "loopback"))
        assert status == 0, err
        address = f"{server.host}:{server.port}"
        status, _, err = run_cli(capsys, address, USER, "--oauth2", str(path))
    assert status == 0 and len(opened) == 1 and saved(path)["grant"] == "loopback"


@pytest.mark.usefixtures("cli_environment")
def test_cli_client_credentials_sign_in_reads_the_secret_from_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "app.json"
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    with oauth_server(client_secret=SECRET) as server:
        argv = cli_sign_in(server, path, "--grant", "client-credentials")
        status, _, err = run_cli(capsys, *argv)
        assert status == 2 and "needs the client secret" in err
        status, out, err = run_cli(capsys, *argv, "--client-secret-file", str(secret_file))
        assert status == 0, err
        status, out, err = run_cli(capsys, f"{server.host}:{server.port}", USER, "-v",
                               "--oauth2", str(path))
    assert status == 0 and SECRET not in out + err


@pytest.mark.usefixtures("cli_environment")
def test_cli_sign_in_needs_a_user(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    with oauth_server(approve_after=0) as server:
        argv = cli_sign_in(server, path)
        del argv[1]  # HOST oauth2 ...: no USER, no ~/.netrc, no terminal to ask at
        status, _, err = run_cli(capsys, *argv)
    assert status == 2 and "no user for" in err and not path.exists()


@pytest.mark.usefixtures("cli_environment")
def test_cli_signs_in_again_with_the_settings_of_the_token_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "alice.json"
    with oauth_server(approve_after=0) as server:
        assert run_cli(capsys, *cli_sign_in(server, path))[0] == 0
        server.oauth2.revoke()
        where = f"{server.host}:{server.port}"
        status, _, err = run_cli(capsys, where, USER, "--oauth2", str(path))
        assert status == 3
        again = err.split(f"run {m._program_name()} ", 1)[1].split()  # the suggested line
        assert again == [where, USER, "oauth2", "--oauth2", str(path)]
        status, _, err = run_cli(capsys, *again)
        assert status == 0, err
        assert run_cli(capsys, where, USER, "--oauth2", str(path))[0] == 0


@pytest.mark.usefixtures("cli_environment")
def test_cli_sign_in_errors_say_no_run_oauth2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "alice.json"
    with oauth_server() as server:
        monkeypatch.setattr(m, "_show_sign_in", lambda message, url: server.oauth2.deny())
        status, _, err = run_cli(capsys, *cli_sign_in(server, path))
    assert status == 3 and "access_denied" in err and "run " not in err


@pytest.mark.usefixtures("cli_environment")
def test_twenty_unattended_save_runs_across_expiries(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "alice.json"
    maildir = tmp_path / "Maildir"
    with oauth_server(access_lifetime=2.0, approve_after=0) as server:
        assert run_cli(capsys, *cli_sign_in(server, path))[0] == 0
        drop = server.maildrops[USER]
        argv = [f"{server.host}:{server.port}", USER, "save", str(maildir), "--new", "-q",
                "--oauth2", str(path)]
        for number in range(20):
            drop.add(b"Subject: run %d\r\n\r\nbody %d\r\n" % (number, number))
            if number % 5 == 4:  # let the access token expire (2 s) now and then
                time.sleep(max(0.0, saved(path)["expires_at"] - time.time()) + 0.05)
            elif number % 5 == 2:  # or be refused by the server while it looks valid
                server.oauth2.expire_access_tokens()
            status, out, err = run_cli(capsys, *argv)
            assert (status, out, err) == (0, "", "")
        refreshes = grants(server).count("refresh_token")
        errors = [r.error for r in server.oauth2.requests if r.error]
    files = [p for p in (maildir / "new").iterdir()]
    subjects = sorted(p.read_bytes().splitlines()[0] for p in files if b"run " in p.read_bytes())
    assert len(files) == 3 + 20  # the preset's 3 and one per run, each saved once
    assert subjects == sorted(b"Subject: run %d" % n for n in range(20))
    assert refreshes >= 8 and errors == []  # every expiry refreshed; no spent token reused


@pytest.mark.usefixtures("cli_environment")
@pytest.mark.parametrize(
    ("trouble", "status", "words"),
    [
        ("expired", 3, "AADSTS700082"),
        ("revoked", 3, "AADSTS50173"),
        ("html", 4, "HTML page"),
        ("500", 4, "HTTP 500"),
        ("huge", 4, "more than 1 MiB"),
        ("silent", 4, "cannot reach the OAuth2 endpoint"),
        ("closed", 4, "cannot reach the OAuth2 endpoint"),
    ],
)
def test_cli_refresh_failures_say_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trouble: str, status: int, words: str
) -> None:
    import socket

    from fakeserver import Fault

    path = tmp_path / "alice.json"
    faulty = trouble in ("html", "500", "huge", "silent")
    faults = [Fault(trouble, "refresh_token")] if faulty else []
    with oauth_server(approve_after=0, faults=faults) as server:
        assert run_cli(capsys, *cli_sign_in(server, path))[0] == 0
        content = saved(path)
        content["expires_at"] = 0
        if trouble == "closed":
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                content["token_url"] = f"http://127.0.0.1:{sock.getsockname()[1]}/token"
        m._write_token_file(str(path), content)
        if trouble == "expired":
            server.oauth2.expire_refresh_tokens()
        if trouble == "revoked":
            server.oauth2.revoke()
        where = f"{server.host}:{server.port}"
        got, out, err = run_cli(capsys, where, USER, "--timeout", "1", "--oauth2", str(path))
        assert server.transcripts == []  # the token is refreshed before connecting
    assert got == status and words in err
    if status == 3:
        hint = f"sign in again: run {m._program_name()} {where} {USER} oauth2 --oauth2 {path}"
        assert err.endswith(hint + "\n")
        assert "invalid_grant" in err
    for secret in secrets_in(path):
        assert secret not in out + err


@pytest.mark.usefixtures("cli_environment")
@pytest.mark.parametrize(
    ("damage", "status", "words"),
    [
        ("corrupt", 3, "is damaged or not a pop3lite token file"),
        ("readable", 1, "is open to other users (mode 644); run chmod 600"),
        ("account", 3, f"was made for '{USER}', not 'alice'"),
        ("provider", 3, "was made for provider 'custom', not 'microsoft'"),
    ],
)
def test_cli_token_file_problems(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, damage: str, status: int, words: str
) -> None:
    path = tmp_path / "alice.json"
    with oauth_server(approve_after=0) as server:
        assert run_cli(capsys, *cli_sign_in(server, path))[0] == 0
        user, extra = USER, []
        if damage == "corrupt":
            path.write_bytes(path.read_bytes()[:40])
        elif damage == "readable":
            path.chmod(0o644)
        elif damage == "account":
            user = "alice"
        else:
            extra = ["--provider", "microsoft"]
        where = f"{server.host}:{server.port}"
        got, out, err = run_cli(capsys, where, user, "--oauth2", str(path), *extra)
    assert got == status and words in err and str(path) in err
    if status == 3:
        assert "oauth2 --oauth2" in err
