"""Tests for pop3lite's OAuth2 section (token source, grants, token file) and its command line.

The pure parts first (PKCE, replies, errors, the token file); then end to end against
fakeserver's FakeOAuth2 authorization server, which issues the tokens its POP3 side accepts.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import pop3lite as m

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
    assert m._seconds(value, 3600.0, "the endpoint", "expires_in") == expected


@pytest.mark.parametrize("value", [-1, "soon", True, [], 1e12])
def test_expires_in_rejects_nonsense(value: object) -> None:
    with pytest.raises(m.OAuth2Error) as caught:
        m._seconds(value, 3600.0, "the endpoint", "expires_in")
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
    ],
    ids=["empty", "broken", "list", "foreign", "format", "expiry", "url", "binary"],
)
def test_a_damaged_token_file_is_named_and_says_sign_in_again(
    tmp_path: Path, content: bytes
) -> None:
    path = write_state(tmp_path / "t.json", content)
    with pytest.raises(m.OAuth2Error) as caught:
        m.OAuth2(path)()
    assert caught.value.reason == "token-file"
    assert path in str(caught.value) and "sign in again" in str(caught.value)


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
        lock = m._TokenFileLock(path, 0.2)
        with pytest.raises(m.OAuth2Error) as caught:
            lock.__enter__()
    finally:
        os.close(holder)
    assert caught.value.reason == "token-file"
    assert "in use by another process" in str(caught.value)


# ---- the command line: secrets from commands ------------------------------------------------


@pytest.fixture
def no_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ~/.netrc, no $POP3_PASSWORD, a stdin that is not a terminal."""
    import io
    import sys

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("POP3_PASSWORD", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = m.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


@pytest.mark.usefixtures("no_password")
def test_password_command_gives_the_first_line(capsys: pytest.CaptureFixture[str]) -> None:
    from fakeserver import FakeServer

    with FakeServer() as server:
        where = f"{server.host}:{server.port}"
        command = "printf 'fugafuga\\r\\nsecond line\\n'; cat"  # cat ends: stdin is closed
        argv = [where, "hogehoge", "uidl", "-v", "--password-command", command]
        status, out, err = run(capsys, *argv)
        assert status == 0, err
        assert "C: PASS ****" in err and "fugafuga" not in out + err
        status, _, err = run(
            capsys, where, "hogehoge", "uidl", "--password-command", "printf wrong"
        )
    assert status == 3 and "(the password came from --password-command)" in err
    assert "wrong" not in err


@pytest.mark.usefixtures("no_password")
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
        status, _, err = run(capsys, *argv)
        assert server.transcripts == []  # nothing was sent: the password came first
    assert status == 2
    assert f"--password-command {command!r}" in err and words in err


@pytest.mark.usefixtures("no_password")
def test_oauth2_token_command(capsys: pytest.CaptureFixture[str]) -> None:
    from fakeserver import FakeServer

    with FakeServer("rfc") as server:
        where = f"{server.host}:{server.port}"
        argv = [where, "hogehoge", "--json", "--oauth2-token-command", "echo fake-oauth-token"]
        status, out, err = run(capsys, *argv)
        assert status == 0, err
        assert json.loads(out)["auth"] == "OAUTHBEARER"
        argv[-1] = "echo another-token"
        status, _, err = run(capsys, *argv)
    assert status == 3 and "the token came from --oauth2-token-command" in err
    assert "another-token" not in err


@pytest.mark.usefixtures("no_password")
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
    status, _, err = run(capsys, "127.0.0.1:9", "alice", *argv)
    assert status == 2 and words in err
