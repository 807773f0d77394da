"""Tests of fakeserver.py's fake OAuth2 authorization server (FakeOAuth2) and of its POP3 side.

Clients here are http.client and raw sockets, never pop3lite (whose OAuth2 client is tested
against this fake elsewhere): the fake must be right on its own. Every socket has a timeout;
nothing sleeps to wait for a server (a test that needs time to pass, for an expiry or a polling
interval, waits for that time itself, and it is a fraction of a second).
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.parse
from typing import Any, Iterator, Mapping

import pytest

from fakeserver import DEVICE_GRANT, FakeOAuth2, FakeServer, Issued, Maildrop

TIMEOUT = 5.0
CLIENT = "pop3lite-test"


class Reply:
    """An HTTP reply: status, headers (lower-case names), body, and the body as JSON."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return str(self.json["error"])


def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: Mapping[str, str] | None = None) -> Reply:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        path = parts.path + ("?" + parts.query if parts.query else "")
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read(1 << 20)
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


def post(url: str, headers: Mapping[str, str] | None = None, **form: str) -> Reply:
    body = urllib.parse.urlencode(form).encode()
    sent = {"Content-Type": "application/x-www-form-urlencoded"}
    sent.update(headers or {})
    return request(url, "POST", body, sent)


def device_code(oauth2: FakeOAuth2, **form: str) -> dict[str, Any]:
    reply = post(oauth2.device_url, client_id=CLIENT, scope="pop offline_access", **form)
    assert reply.status == 200, reply.body
    return dict(reply.json)


def poll(oauth2: FakeOAuth2, code: str) -> Reply:
    return post(oauth2.token_url, grant_type=DEVICE_GRANT, client_id=CLIENT, device_code=code)


def refresh(oauth2: FakeOAuth2, token: str) -> Reply:
    return post(oauth2.token_url, grant_type="refresh_token", client_id=CLIENT,
                refresh_token=token)


def signed_in(oauth2: FakeOAuth2, user: str | None = None) -> dict[str, Any]:
    """Tokens from the device grant, approved by the test."""
    code = device_code(oauth2)
    oauth2.approve(code["user_code"], user)
    reply = poll(oauth2, code["device_code"])
    assert reply.status == 200, reply.body
    return dict(reply.json)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Pop:
    """A raw-socket POP3 client: send lines, read lines."""

    def __init__(self, server: FakeServer) -> None:
        self.sock = socket.create_connection(server.address, timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        assert self.line().startswith("+OK")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def line(self) -> str:
        return self.file.readline(100000).decode().rstrip("\r\n")

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.line()


def xoauth2(user: str, token: str) -> str:
    return b64(b"user=%s\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode()))


def oauthbearer(user: str, token: str) -> str:
    return b64(b"n,a=%s,\x01host=localhost\x01port=110\x01auth=Bearer %s\x01\x01"
               % (user.encode(), token.encode()))


def login(server: FakeServer, mechanism: str, user: str, token: str, initial: bool) -> str:
    """AUTH with a bearer token; the final reply. A refusal's error challenge is answered as
    RFC 7628 section 3.2.3 says (OAUTHBEARER: %x01; XOAUTH2: an empty line)."""
    blob = (xoauth2 if mechanism == "XOAUTH2" else oauthbearer)(user, token)
    pop = Pop(server)
    try:
        if initial:
            reply = pop.cmd("AUTH %s %s" % (mechanism, blob))
        else:
            assert pop.cmd("AUTH " + mechanism) == "+ "  # two steps, as Microsoft requires
            reply = pop.cmd(blob)
        if reply.startswith("+ "):
            details = json.loads(base64.b64decode(reply[2:]))
            assert "status" in details
            reply = pop.cmd("AQ==" if mechanism == "OAUTHBEARER" else "")
        return reply
    finally:
        pop.close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    oauth2 = FakeOAuth2(access_lifetime=2.0, device_interval=0.05)
    with FakeServer("rfc", oauth2=oauth2) as started:
        yield started


# ----- device authorization grant (RFC 8628) --------------------------------------------


def test_device_authorization_reply(server: FakeServer) -> None:
    oauth2 = server.oauth2
    assert oauth2 is not None
    reply = post(oauth2.device_url, client_id=CLIENT, scope="pop offline_access")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    code = reply.json
    assert code["verification_uri"] == oauth2.base_url + "/device"
    assert code["expires_in"] == 600 and code["interval"] == 0.05
    assert len(code["device_code"]) >= 32
    letters = code["user_code"].replace("-", "")
    assert len(letters) == 8 and set(letters) <= set("BCDFGHJKLMNPQRSTVWXZ")
    assert code["user_code"] in code["message"]


def test_device_grant_pending_until_the_test_approves(server: FakeServer) -> None:
    oauth2 = server.oauth2
    assert oauth2 is not None
    code = device_code(oauth2)
    pending = poll(oauth2, code["device_code"])
    assert pending.status == 400 and pending.error == "authorization_pending"
    assert pending.json["error_codes"] == [70016]
    assert pending.json["error_description"].startswith("AADSTS70016: ")
    time.sleep(0.05)  # the polling interval
    oauth2.approve(code["user_code"])
    tokens = poll(oauth2, code["device_code"])
    assert tokens.status == 200 and tokens.headers["cache-control"] == "no-store"
    body = tokens.json
    assert body["token_type"] == "Bearer" and body["expires_in"] == 2
    assert body["scope"] == "pop offline_access"
    assert body["access_token"] != body["refresh_token"]
    assert oauth2.issued == [Issued("device_code", "hogehoge", "pop offline_access", True)]
    again = poll(oauth2, code["device_code"])  # a device code is good for one token reply
    assert again.error == "invalid_grant" and again.json["error_codes"] == [54005]


def test_device_grant_approved_after_n_polls() -> None:
    with FakeOAuth2(device_interval=0.01, approve_after=2, user="alice") as oauth2:
        code = device_code(oauth2)
        errors = []
        for _ in range(3):
            reply = poll(oauth2, code["device_code"])
            errors.append(reply.error if reply.status != 200 else None)
            time.sleep(0.01)
        assert errors == ["authorization_pending", "authorization_pending", None]
        assert oauth2.issued[0].user == "alice"
        assert [r.error for r in oauth2.requests] == [None] + errors


def test_approve_before_the_device_code_is_requested() -> None:
    with FakeOAuth2() as oauth2:
        oauth2.approve(user="bob")
        code = device_code(oauth2)
        assert poll(oauth2, code["device_code"]).status == 200
        assert oauth2.issued[-1].user == "bob"
        with pytest.raises(ValueError):
            oauth2.approve("BCDF-GHJK")  # no such pending code


# ----- refresh tokens ---------------------------------------------------------------------


def test_refresh_rotates_and_the_spent_token_is_refused(server: FakeServer) -> None:
    oauth2 = server.oauth2
    assert oauth2 is not None
    first = signed_in(oauth2)
    second = refresh(oauth2, first["refresh_token"])
    assert second.status == 200
    assert second.json["refresh_token"] != first["refresh_token"]
    assert second.json["access_token"] != first["access_token"]
    assert second.json["scope"] == first["scope"]
    spent = refresh(oauth2, first["refresh_token"])
    assert spent.status == 400 and spent.error == "invalid_grant"
    assert spent.json["error_codes"] == [70000]
    assert spent.json["error_description"].startswith("AADSTS70000: ")
    assert refresh(oauth2, second.json["refresh_token"]).status == 200
    assert [entry.grant for entry in oauth2.issued] == [
        "device_code", "refresh_token", "refresh_token"]


def test_unknown_refresh_token_is_refused(server: FakeServer) -> None:
    assert server.oauth2 is not None
    reply = refresh(server.oauth2, "made-up")
    assert reply.error == "invalid_grant" and reply.json["error_codes"] == [70000]


# ----- the POP3 side ----------------------------------------------------------------------


@pytest.mark.parametrize("initial", [False, True], ids=["two-step", "initial-response"])
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_pop3_accepts_an_issued_token(server: FakeServer, mechanism: str, initial: bool
                                      ) -> None:
    assert server.oauth2 is not None
    token = signed_in(server.oauth2)["access_token"]
    assert login(server, mechanism, "hogehoge", token, initial) == "+OK maildrop locked and ready"
    assert server.sessions[0].mechanism == mechanism
    assert token not in "\n".join(server.sessions[0].transcript)
    assert token not in repr(server.oauth2) + repr(server.oauth2.issued)


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_pop3_refuses_unknown_and_static_tokens(server: FakeServer, mechanism: str) -> None:
    refused = "-ERR [AUTH] invalid user name or password"
    assert login(server, mechanism, "hogehoge", "made-up", True) == refused
    # With OAuth2 on, the preset's static token is not accepted: only tokens it issued.
    assert login(server, mechanism, "hogehoge", "fake-oauth-token", True) == refused


def test_static_token_still_works_when_given_explicitly() -> None:
    with FakeServer("rfc", oauth_token="static", oauth2=True) as server:
        assert login(server, "XOAUTH2", "hogehoge", "static", True).startswith("+OK")
    with FakeServer("rfc") as server:
        assert server.oauth2 is None
        assert login(server, "XOAUTH2", "hogehoge", "fake-oauth-token", True).startswith("+OK")


def test_pop3_refuses_an_expired_token() -> None:
    oauth2 = FakeOAuth2(access_lifetime=0.2)
    with FakeServer("rfc", oauth2=oauth2) as server:
        token = signed_in(oauth2)["access_token"]
        assert login(server, "OAUTHBEARER", "hogehoge", token, True).startswith("+OK")
        server.wait_idle()
        time.sleep(0.2)  # the token's lifetime
        assert login(server, "OAUTHBEARER", "hogehoge", token, True).startswith("-ERR [AUTH]")
        fresh = signed_in(oauth2)["access_token"]
        oauth2.expire_access_tokens()
        assert login(server, "XOAUTH2", "hogehoge", fresh, False).startswith("-ERR [AUTH]")


def test_pop3_refuses_a_token_issued_for_another_user() -> None:
    users = {"alice": Maildrop("a"), "bob": Maildrop("b")}
    with FakeServer("rfc", users=users, oauth2=True) as server:
        assert server.oauth2 is not None and server.oauth2.default_user == "alice"
        token = signed_in(server.oauth2, "bob")["access_token"]
        assert login(server, "XOAUTH2", "alice", token, False).startswith("-ERR [AUTH]")
        assert login(server, "XOAUTH2", "bob", token, False).startswith("+OK")
        nobody = signed_in(server.oauth2, "carol")["access_token"]  # no such mailbox
        assert login(server, "XOAUTH2", "carol", nobody, False).startswith("-ERR [AUTH]")
