"""Tests of fakeserver.py's fake OAuth2 authorization server (FakeOAuth2) and of its POP3 side.

Clients here are http.client and raw sockets, never pop3lite (whose OAuth2 client is tested
against this fake elsewhere): the fake must be right on its own. Every socket has a timeout;
nothing sleeps to wait for a server (a test that needs time to pass, for an expiry or a polling
interval, waits for that time itself, and it is a fraction of a second).
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import http.server
import json
import logging
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from conftest import TIMEOUT, RawClient, b64, wait_until
from fakeserver import (
    DEVICE_GRANT,
    FakeOAuth2,
    FakeServer,
    Fault,
    Issued,
    Maildrop,
    OAuth2Request,
)

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent
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


def xoauth2(user: str, token: str) -> str:
    return b64(b"user=%s\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode()))


def oauthbearer(user: str, token: str) -> str:
    return b64(b"n,a=%s,\x01host=localhost\x01port=110\x01auth=Bearer %s\x01\x01"
               % (user.encode(), token.encode()))


def auth(server: FakeServer | tuple[str, int], mechanism: str, user: str, token: str,
         initial: bool) -> str:
    """AUTH with a bearer token; the final reply. A refusal's error challenge is answered as
    RFC 7628 section 3.2.3 says (OAUTHBEARER: %x01; XOAUTH2: an empty line)."""
    blob = (xoauth2 if mechanism == "XOAUTH2" else oauthbearer)(user, token)
    pop = RawClient(server)
    try:
        assert pop.line().startswith(b"+OK")
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
def server(pop3_oauth2_server: FakeServer) -> FakeServer:
    """The plugin's POP3 server with a FakeOAuth2 beside it (2 s tokens, fast polling)."""
    return pop3_oauth2_server


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
    assert code["expires_in"] == 60 and code["interval"] == 0.05
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
    assert auth(server, mechanism, "hogehoge", token, initial) == "+OK maildrop locked and ready"
    assert server.sessions[0].mechanism == mechanism
    assert token not in "\n".join(server.sessions[0].transcript)
    assert token not in repr(server.oauth2) + repr(server.oauth2.issued)


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_pop3_refuses_unknown_and_static_tokens(server: FakeServer, mechanism: str) -> None:
    refused = "-ERR [AUTH] invalid user name or password"
    assert auth(server, mechanism, "hogehoge", "made-up", True) == refused
    # With OAuth2 on, the preset's static token is not accepted: only tokens it issued.
    assert auth(server, mechanism, "hogehoge", "fake-oauth-token", True) == refused


def test_static_token_still_works_when_given_explicitly() -> None:
    with FakeServer("rfc", oauth_token="static", oauth2=True) as server:
        assert auth(server, "XOAUTH2", "hogehoge", "static", True).startswith("+OK")
    with FakeServer("rfc") as server:
        assert server.oauth2 is None
        assert auth(server, "XOAUTH2", "hogehoge", "fake-oauth-token", True).startswith("+OK")


def test_pop3_refuses_an_expired_token() -> None:
    oauth2 = FakeOAuth2(access_lifetime=0.2)
    with FakeServer("rfc", oauth2=oauth2) as server:
        token = signed_in(oauth2)["access_token"]
        assert auth(server, "OAUTHBEARER", "hogehoge", token, True).startswith("+OK")
        server.wait_idle()
        time.sleep(0.2)  # the token's lifetime
        assert auth(server, "OAUTHBEARER", "hogehoge", token, True).startswith("-ERR [AUTH]")
        fresh = signed_in(oauth2)["access_token"]
        oauth2.expire_access_tokens()
        assert auth(server, "XOAUTH2", "hogehoge", fresh, False).startswith("-ERR [AUTH]")


def test_pop3_refuses_a_token_issued_for_another_user() -> None:
    users = {"alice": Maildrop("a"), "bob": Maildrop("b")}
    with FakeServer("rfc", users=users, oauth2=True) as server:
        assert server.oauth2 is not None and server.oauth2.default_user == "alice"
        token = signed_in(server.oauth2, "bob")["access_token"]
        assert auth(server, "XOAUTH2", "alice", token, False).startswith("-ERR [AUTH]")
        assert auth(server, "XOAUTH2", "bob", token, False).startswith("+OK")
        nobody = signed_in(server.oauth2, "carol")["access_token"]  # no such mailbox
        assert auth(server, "XOAUTH2", "carol", nobody, False).startswith("-ERR [AUTH]")


def test_client_credentials_token_is_good_for_every_user() -> None:
    users = {"alice": Maildrop("a"), "bob": Maildrop("b")}
    oauth2 = FakeOAuth2(client_secret="s3cret")
    with FakeServer("rfc", users=users, oauth2=oauth2) as server:
        reply = post(oauth2.token_url, grant_type="client_credentials", client_id=CLIENT,
                     client_secret="s3cret", scope="https://outlook.office365.com/.default")
        assert reply.status == 200 and "refresh_token" not in reply.json  # RFC 6749 4.4.3
        token = reply.json["access_token"]
        assert oauth2.issued == [Issued("client_credentials", None,
                                        "https://outlook.office365.com/.default", False)]
        assert auth(server, "XOAUTH2", "alice", token, False).startswith("+OK")
        assert auth(server, "OAUTHBEARER", "bob", token, True).startswith("+OK")
        assert auth(server, "XOAUTH2", "carol", token, True).startswith("-ERR [AUTH]")


# ----- authorization code grant with PKCE and a loopback redirect (RFC 7636, RFC 8252) -----


class Loopback:
    """The client's side of the loopback redirect: one listener on 127.0.0.1 that records the
    query of each request it gets (RFC 8252 section 7.3)."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = urllib.parse.urlsplit(self.path).query
                owner.queries.append(dict(urllib.parse.parse_qsl(query)))
                body = b"<p>Signed in; you can close this window.</p>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.http = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.http.timeout = TIMEOUT
        self.uri = "http://127.0.0.1:%d/" % self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.handle_request, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.thread.join(TIMEOUT)
        self.http.server_close()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_url(oauth2: FakeOAuth2, redirect_uri: str, challenge: str, **extra: str) -> str:
    fields = {"client_id": CLIENT, "response_type": "code", "redirect_uri": redirect_uri,
              "scope": "https://mail.google.com/", "state": "st-1",
              "code_challenge": challenge, "code_challenge_method": "S256"}
    fields.update(extra)
    return oauth2.auth_url + "?" + urllib.parse.urlencode(fields)


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    listener = Loopback()
    yield listener
    listener.close()


def exchange(oauth2: FakeOAuth2, code: str, verifier: str, redirect_uri: str) -> Reply:
    return post(oauth2.token_url, grant_type="authorization_code", client_id=CLIENT, code=code,
                code_verifier=verifier, redirect_uri=redirect_uri)


def test_authorization_code_grant_through_the_browser(server: FakeServer, loopback: Loopback
                                                      ) -> None:
    oauth2 = server.oauth2
    assert oauth2 is not None
    verifier, challenge = pkce()
    state = "a b&c=d/\u00e9"  # any text comes back as it was sent
    oauth2.browse(authorize_url(oauth2, loopback.uri, challenge, state=state))
    loopback.close()
    [query] = loopback.queries
    assert query["state"] == state and set(query) == {"code", "state"}
    reply = exchange(oauth2, query["code"], verifier, loopback.uri)
    assert reply.status == 200 and reply.json["scope"] == "https://mail.google.com/"
    assert oauth2.issued == [Issued("authorization_code", "hogehoge",
                                    "https://mail.google.com/", True)]
    token = reply.json["access_token"]
    assert auth(server, "XOAUTH2", "hogehoge", token, True).startswith("+OK")
    again = exchange(oauth2, query["code"], verifier, loopback.uri)
    assert again.error == "invalid_grant" and again.json["error_codes"] == [54005]
    assert refresh(oauth2, reply.json["refresh_token"]).status == 200


def test_browse_signs_in_as_the_given_user(loopback: Loopback) -> None:
    with FakeOAuth2() as oauth2:
        verifier, challenge = pkce()
        oauth2.browse(authorize_url(oauth2, loopback.uri, challenge), user="alice@example.com")
        loopback.close()
        code = loopback.queries[0]["code"]
        assert exchange(oauth2, code, verifier, loopback.uri).status == 200
        assert oauth2.issued[0].user == "alice@example.com"


def test_browse_declining(loopback: Loopback) -> None:
    with FakeOAuth2() as oauth2:
        oauth2.browse(authorize_url(oauth2, loopback.uri, pkce()[1]), deny=True)
        loopback.close()
        assert loopback.queries[0]["error"] == "access_denied"
        assert loopback.queries[0]["state"] == "st-1" and "code" not in loopback.queries[0]


def code_for(oauth2: FakeOAuth2, redirect_uri: str, challenge: str) -> str:
    reply = request(authorize_url(oauth2, redirect_uri, challenge))
    assert reply.status == 302, reply.body
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(reply.headers["location"]).query))
    return query["code"]


def test_pkce_mismatch_is_refused_and_spends_the_code() -> None:
    with FakeOAuth2() as oauth2:
        verifier, challenge = pkce()
        redirect = "http://127.0.0.1:9/callback"
        code = code_for(oauth2, redirect, challenge)
        wrong = exchange(oauth2, code, pkce()[0], redirect)
        assert wrong.error == "invalid_grant" and wrong.json["error_codes"] == [501481]
        assert exchange(oauth2, code, verifier, redirect).json["error_codes"] == [54005]
        missing = post(oauth2.token_url, grant_type="authorization_code", client_id=CLIENT,
                       code=code_for(oauth2, redirect, challenge), redirect_uri=redirect)
        assert missing.json["error_codes"] == [501481]
        assert oauth2.issued == []


def test_redirect_uri_must_match_the_authorization_request() -> None:
    with FakeOAuth2() as oauth2:
        verifier, challenge = pkce()
        code = code_for(oauth2, "http://127.0.0.1:9/a", challenge)
        reply = exchange(oauth2, code, verifier, "http://127.0.0.1:9/b")
        assert reply.error == "invalid_grant" and reply.json["error_codes"] == [50148]
        assert exchange(oauth2, "made-up", verifier, "http://127.0.0.1:9/a").json[
            "error_codes"] == [70000]


@pytest.mark.parametrize("redirect_uri", [
    "https://127.0.0.1:8080/", "http://example.com:8080/", "http://10.0.0.1/",
    "http://127.0.0.1.example.com/", "", "http://127.0.0.1:99999/", "http://127.0.0.1/#frag",
])
def test_authorize_takes_only_a_loopback_redirect(redirect_uri: str) -> None:
    with FakeOAuth2() as oauth2:
        url = authorize_url(oauth2, redirect_uri, pkce()[1])
        reply = request(url)
        assert reply.status == 400 and "location" not in reply.headers  # no redirect (4.1.2.1)
        assert reply.error == "invalid_request"
        with pytest.raises(ValueError, match="refused"):
            oauth2.browse(url)


@pytest.mark.parametrize("redirect_uri", [
    "http://127.0.0.1:8080/", "http://[::1]:8080/cb?x=1", "http://localhost:1/"])
def test_authorize_redirects_to_any_loopback_address(redirect_uri: str) -> None:
    with FakeOAuth2() as oauth2:
        reply = request(authorize_url(oauth2, redirect_uri, pkce()[1]))
        assert reply.status == 302 and reply.headers["location"].startswith(redirect_uri)
        assert reply.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(("extra", "error"), [
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge": "short"}, "invalid_request"),
])
def test_authorize_errors_go_back_with_the_state(extra: dict[str, str], error: str) -> None:
    with FakeOAuth2() as oauth2:
        reply = request(authorize_url(oauth2, "http://127.0.0.1:9/", pkce()[1], **extra))
        assert reply.status == 302
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
            reply.headers["location"]).query))
        assert query["error"] == error and query["state"] == "st-1" and "code" not in query
        assert oauth2.requests[-1].error == error


def test_authorize_refuses_an_unknown_client() -> None:
    with FakeOAuth2() as oauth2:
        reply = request(authorize_url(oauth2, "http://127.0.0.1:9/", pkce()[1],
                                      client_id="someone-else"))
        assert reply.status == 400 and "location" not in reply.headers
        assert reply.json["error_codes"] == [700016]
        with pytest.raises(ValueError, match="not this server's"):
            oauth2.browse("http://example.com/authorize?x=1")


# ----- client authentication (RFC 6749 section 2.3.1) ----------------------------------------


def basic(client_id: str, secret: str) -> dict[str, str]:
    pair = "%s:%s" % (urllib.parse.quote_plus(client_id), urllib.parse.quote_plus(secret))
    return {"Authorization": "Basic " + b64(pair.encode())}


def test_client_secret_in_the_body_or_in_http_basic() -> None:
    with FakeOAuth2(client_secret="s3:cr&t") as oauth2:
        form = {"grant_type": "client_credentials", "scope": "pop"}
        assert post(oauth2.token_url, client_id=CLIENT, client_secret="s3:cr&t",
                    **form).status == 200
        assert post(oauth2.token_url, basic(CLIENT, "s3:cr&t"), **form).status == 200
        wrong = post(oauth2.token_url, basic(CLIENT, "guess"), **form)
        assert wrong.status == 401 and wrong.error == "invalid_client"
        assert wrong.json["error_codes"] == [7000215]
        missing = post(oauth2.token_url, client_id=CLIENT, **form)
        assert missing.status == 401 and missing.json["error_codes"] == [7000218]
        # A registration with a secret (a confidential client) authenticates in every grant.
        assert post(oauth2.device_url, client_id=CLIENT).json["error_codes"] == [7000218]
        code = post(oauth2.device_url, basic(CLIENT, "s3:cr&t")).json["device_code"]
        assert poll(oauth2, code).json["error_codes"] == [7000218]
        bad = post(oauth2.token_url, {"Authorization": "Basic !!!"}, **form)
        assert bad.status == 401 and bad.error == "invalid_client"
        other = post(oauth2.token_url, basic(CLIENT, "s3:cr&t"), client_id="other", **form)
        assert other.status == 400 and other.error == "invalid_request"
        assert len(oauth2.issued) == 2


def test_client_credentials_need_a_registration_with_a_secret() -> None:
    with FakeOAuth2() as oauth2:
        reply = post(oauth2.token_url, grant_type="client_credentials", client_id=CLIENT,
                     client_secret="anything")
        assert reply.status == 401 and reply.error == "invalid_client"
        assert "has no secret" in reply.json["error_description"]
        assert "must contain" not in reply.json["error_description"]
        reply = post(oauth2.token_url, grant_type="client_credentials", client_id=CLIENT)
        assert reply.status == 401 and reply.json["error_codes"] == [7000218]


@pytest.mark.parametrize("client_id", ["someone-else", ""])
def test_unknown_client_id(client_id: str) -> None:
    with FakeOAuth2() as oauth2:
        reply = post(oauth2.device_url, client_id=client_id)
        if client_id:
            assert reply.status == 401 and reply.error == "invalid_client"
            assert reply.json["error_codes"] == [700016]
        else:
            assert reply.status == 400 and reply.error == "invalid_request"
        assert refresh(oauth2, "x").status == 400  # the right client id: only the token is bad


@pytest.mark.parametrize(("form", "error", "code"), [
    ({}, "invalid_request", 900144),
    ({"grant_type": "password"}, "unsupported_grant_type", 70003),
    ({"grant_type": "refresh_token"}, "invalid_request", 900144),
    ({"grant_type": DEVICE_GRANT}, "invalid_request", 900144),
    ({"grant_type": "authorization_code"}, "invalid_request", 900144),
])
def test_token_request_missing_parameters(form: dict[str, str], error: str, code: int) -> None:
    with FakeOAuth2() as oauth2:
        reply = post(oauth2.token_url, client_id=CLIENT, **form)
        assert reply.status == 400 and reply.error == error
        assert reply.json["error_codes"] == [code]
        assert reply.json["error_description"].startswith("AADSTS%d: " % code)
        assert "\r\nTrace ID: " in reply.json["error_description"]


# ----- device grant errors (RFC 8628 section 3.5) ----------------------------------------------


def test_device_code_denied() -> None:
    with FakeOAuth2() as oauth2:
        code = device_code(oauth2)
        oauth2.deny()
        reply = poll(oauth2, code["device_code"])
        assert reply.error == "access_denied"
        assert poll(oauth2, "made-up").error == "invalid_grant"
        oauth2.deny()  # in advance: the next device code
        assert poll(oauth2, device_code(oauth2)["device_code"]).error == "access_denied"
        assert oauth2.issued == []


def test_device_code_expires() -> None:
    with FakeOAuth2(device_lifetime=0.2, device_interval=0.01) as oauth2:
        code = device_code(oauth2)
        assert code["expires_in"] == 0.2
        assert poll(oauth2, code["device_code"]).error == "authorization_pending"
        time.sleep(0.2)  # the device code's lifetime
        oauth2.approve(code["user_code"])
        reply = poll(oauth2, code["device_code"])
        assert reply.error == "expired_token" and reply.json["error_codes"] == [70019]


def test_polling_sooner_than_the_interval_gets_slow_down() -> None:
    with FakeOAuth2(device_interval=5.0) as oauth2:  # an immediate poll is surely too soon
        code = device_code(oauth2)["device_code"]
        assert poll(oauth2, code).error == "authorization_pending"
        assert poll(oauth2, code).error == "slow_down"
        assert poll(oauth2, code).error == "slow_down"


def test_polling_after_the_interval_is_never_too_soon() -> None:
    # Measured from the previous reply, so a late request cannot make the next look early.
    with FakeOAuth2(device_interval=0.05, approve_after=3) as oauth2:
        code = device_code(oauth2)["device_code"]
        errors = []
        for _ in range(4):
            reply = poll(oauth2, code)
            errors.append(reply.error if reply.status != 200 else None)
            time.sleep(0.05)
        assert errors == ["authorization_pending"] * 3 + [None]


def test_slow_down_lengthens_the_interval() -> None:
    # RFC 8628 section 3.5: after slow_down the interval grows by 5 s (here slow_down_step).
    faults = [Fault("slow_down", times=1)]
    with FakeOAuth2(device_interval=0.05, slow_down_step=3.0, faults=faults,
                    approve_after=0) as oauth2:
        code = device_code(oauth2)["device_code"]
        assert poll(oauth2, code).error == "slow_down"
        time.sleep(0.05)  # the first interval is no longer enough
        assert poll(oauth2, code).error == "slow_down"
        assert oauth2.issued == []


# ----- refresh token expiry and revocation -----------------------------------------------------


def test_refresh_token_lifetime() -> None:
    with FakeOAuth2(refresh_lifetime=0.2) as oauth2:
        tokens = signed_in(oauth2)
        time.sleep(0.2)  # the refresh token's lifetime
        reply = refresh(oauth2, tokens["refresh_token"])
        assert reply.error == "invalid_grant" and reply.json["error_codes"] == [700082]
        assert reply.json["error_description"].startswith("AADSTS700082: ")


def test_expire_refresh_tokens_and_revoke(server: FakeServer) -> None:
    oauth2 = server.oauth2
    assert oauth2 is not None
    first = signed_in(oauth2)
    oauth2.expire_refresh_tokens()
    assert refresh(oauth2, first["refresh_token"]).json["error_codes"] == [700082]
    assert auth(server, "XOAUTH2", "hogehoge", first["access_token"], True).startswith("+OK")
    server.wait_idle()
    second = signed_in(oauth2)  # tokens issued later are not expired
    third = refresh(oauth2, second["refresh_token"]).json
    oauth2.revoke()
    assert refresh(oauth2, third["refresh_token"]).json["error_codes"] == [50173]
    assert auth(server, "XOAUTH2", "hogehoge", third["access_token"], True).startswith("-ERR")


# ----- faults of the token endpoint ----------------------------------------------------------


def test_fault_html_and_500_then_normal_service() -> None:
    faults = [Fault("html", times=1), Fault("500", times=1)]
    with FakeOAuth2(faults=faults) as oauth2:
        code = device_code(oauth2)
        oauth2.approve(code["user_code"])
        html = poll(oauth2, code["device_code"])
        assert html.status == 200 and html.headers["content-type"].startswith("text/html")
        assert html.body.startswith(b"<!DOCTYPE html>")
        failed = poll(oauth2, code["device_code"])
        assert failed.status == 500 and failed.headers["content-type"].startswith("text/html")
        assert poll(oauth2, code["device_code"]).status == 200  # `times` used up
        assert [r.error for r in oauth2.requests] == [None, "fault:html", "fault:500", None]


def test_fault_selects_a_grant_or_the_device_endpoint() -> None:
    faults = [Fault("500", command="refresh_token"), Fault("html", command="devicecode",
                                                           times=1)]
    with FakeOAuth2(faults=faults, approve_after=0) as oauth2:
        assert post(oauth2.device_url, client_id=CLIENT).status == 200  # HTML: no JSON
        assert post(oauth2.device_url, client_id=CLIENT).headers["content-type"] == (
            "application/json")
        tokens = poll(oauth2, device_code(oauth2)["device_code"]).json  # not faulted
        assert refresh(oauth2, tokens["refresh_token"]).status == 500
        assert refresh(oauth2, tokens["refresh_token"]).status == 500  # no `times`: always


def test_fault_huge_body() -> None:
    with FakeOAuth2(faults=[Fault("huge", times=1)]) as oauth2:
        parts = urllib.parse.urlsplit(oauth2.token_url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port,
                                                timeout=TIMEOUT)
        body = urllib.parse.urlencode({"grant_type": "refresh_token", "client_id": CLIENT,
                                       "refresh_token": "x"})
        connection.request("POST", parts.path, body,
                           {"Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(10 * 1024 * 1024)
        received = 0
        for _ in range(200):  # 10 MiB in 64 KiB reads
            data = response.read(65536)
            if not data:
                break
            received += len(data)
        connection.close()
        assert received == 10 * 1024 * 1024
        assert refresh(oauth2, "x").error == "invalid_grant"


def test_fault_huge_body_to_a_client_that_stops_reading() -> None:
    with FakeOAuth2(faults=[Fault("huge", times=1)]) as oauth2:
        with socket.create_connection(oauth2.address, timeout=TIMEOUT) as sock:
            body = b"grant_type=refresh_token&client_id=pop3lite-test&refresh_token=x"
            sock.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            assert sock.recv(100).startswith(b"HTTP/1.0 200")
        # The handler's writes fail or are cut off by close(): the server stays usable.
        assert refresh(oauth2, "x").error == "invalid_grant"
    assert oauth2.errors == []


def test_fault_silent_and_other_clients_are_served() -> None:
    with FakeOAuth2(faults=[Fault("silent", command="refresh_token")]) as oauth2:
        parts = urllib.parse.urlsplit(oauth2.token_url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=0.3)
        connection.request("POST", "/token", "grant_type=refresh_token&client_id=x",
                           {"Content-Type": "application/x-www-form-urlencoded"})
        with pytest.raises(socket.timeout):
            connection.getresponse()
        connection.close()
        assert post(oauth2.device_url, client_id=CLIENT).status == 200
        assert oauth2.requests[0] == OAuth2Request("/token", "refresh_token", "fault:silent")


def test_close_does_not_wait_for_a_silent_reply() -> None:
    oauth2 = FakeOAuth2(faults=["silent"])
    server = FakeServer("rfc", oauth2=oauth2).start()
    results: list[BaseException] = []

    def ask() -> None:
        try:
            refresh(oauth2, "x")
        except BaseException as error:  # noqa: BLE001 (the test looks at it)
            results.append(error)

    client = threading.Thread(target=ask)
    client.start()
    wait_until(lambda: bool(oauth2.requests))
    assert oauth2.requests[0].error == "fault:silent"
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 2.0
    client.join(TIMEOUT)
    assert not client.is_alive()
    assert isinstance(results[0], http.client.RemoteDisconnected)  # closed, no reply


def test_unknown_fault_kind_or_command() -> None:
    with pytest.raises(ValueError, match="fault kind"):
        FakeOAuth2(faults=["delay"])
    with pytest.raises(ValueError, match="grant type"):
        FakeOAuth2(faults=[Fault("500", command="RETR")])


# ----- bad requests ------------------------------------------------------------------------


def raw_http(oauth2: FakeOAuth2, data: bytes) -> Reply:
    """Send raw bytes, then parse the reply (status line, headers, body up to the close)."""
    with socket.create_connection(oauth2.address, timeout=TIMEOUT) as sock:
        sock.sendall(data)
        received = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return Reply(int(lines[0].split()[1]), headers, body)


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(("data", "status"), [
    (b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: " + FORM.encode() + b"\r\n\r\n", 411),
    (b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /token HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /token HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 411),
    (b"BREW /token HTTP/1.1\r\n\r\n", 501),
    (b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"\x00\xff garbage here\r\n\r\n", 400),
    (b"GET /authorize?%ff HTTP/1.1\r\n\r\n", 400),
    (b"GET /authorize HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
])
def test_malformed_http_gets_a_json_error(data: bytes, status: int) -> None:
    with FakeOAuth2() as oauth2:
        reply = raw_http(oauth2, data)
        assert reply.status == status
        assert reply.headers["content-type"] == "application/json"
        assert reply.error == "invalid_request"
        assert post(oauth2.device_url, client_id=CLIENT).status == 200  # still serving
    assert oauth2.errors == []


@pytest.mark.parametrize(("body", "content_type"), [
    (b"grant_type=refresh_token&grant_type=refresh_token&client_id=pop3lite-test", FORM),
    (b"grant_type=refresh%ff&client_id=pop3lite-test", FORM),
    (b"grant_type=\xe9&client_id=pop3lite-test", FORM),
    (b'{"grant_type": "refresh_token"}', "application/json"),
])
def test_malformed_form_is_invalid_request(body: bytes, content_type: str) -> None:
    with FakeOAuth2() as oauth2:
        reply = request(oauth2.token_url, "POST", body, {"Content-Type": content_type})
        assert reply.status == 400 and reply.error == "invalid_request"
        assert reply.json["error_codes"] == [900144]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/token", 405), ("GET", "/devicecode", 405), ("GET", "/nowhere", 404),
    ("POST", "/nowhere", 404), ("POST", "/authorize", 404),
])
def test_wrong_method_or_path(method: str, path: str, status: int) -> None:
    with FakeOAuth2() as oauth2:
        body = b"client_id=pop3lite-test" if method == "POST" else None
        reply = request(oauth2.base_url + path, method, body, {"Content-Type": FORM})
        assert reply.status == status and reply.error == "invalid_request"


def test_a_client_that_stops_in_the_middle_of_its_request() -> None:
    with FakeOAuth2() as oauth2:
        with socket.create_connection(oauth2.address, timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /token HTTP/1.1\r\nContent-Length: 100\r\n\r\nclient_id=")
        with socket.create_connection(oauth2.address, timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /token HTTP/1.1\r\nContent-Le")  # and then nothing
            assert post(oauth2.device_url, client_id=CLIENT).status == 200
    assert oauth2.errors == []


# ----- many clients at once ------------------------------------------------------------------


def test_concurrent_clients() -> None:
    with FakeServer("rfc", oauth2=FakeOAuth2(approve_after=0)) as server:
        oauth2 = server.oauth2
        assert oauth2 is not None

        def sign_in_and_refresh(_: int) -> tuple[str, str, str]:
            tokens = poll(oauth2, device_code(oauth2)["device_code"]).json
            renewed = refresh(oauth2, tokens["refresh_token"]).json
            spent = refresh(oauth2, tokens["refresh_token"]).error
            return tokens["access_token"], renewed["access_token"], spent

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(sign_in_and_refresh, range(16), timeout=TIMEOUT * 2))
        tokens = [token for result in results for token in result[:2]]
        assert len(set(tokens)) == 32
        assert {result[2] for result in results} == {"invalid_grant"}
        assert len(oauth2.issued) == 32
        assert auth(server, "XOAUTH2", "hogehoge", tokens[-1], False).startswith("+OK")


# ----- secrets stay secret -----------------------------------------------------------------


def test_no_secret_in_logs_or_reprs(caplog: pytest.LogCaptureFixture,
                                    loopback: Loopback) -> None:
    caplog.set_level(logging.DEBUG, logger="fakeserver")
    oauth2 = FakeOAuth2(client_secret="the-secret", access_lifetime=2.0)
    with FakeServer("rfc", oauth2=oauth2) as server:
        code = post(oauth2.device_url, basic(CLIENT, "the-secret")).json
        oauth2.approve()
        tokens = post(oauth2.token_url, basic(CLIENT, "the-secret"), grant_type=DEVICE_GRANT,
                      device_code=code["device_code"]).json
        verifier, challenge = pkce()
        oauth2.browse(authorize_url(oauth2, loopback.uri, challenge, state="the-state"))
        loopback.close()
        auth_code = loopback.queries[0]["code"]
        assert auth(server, "XOAUTH2", "hogehoge", tokens["access_token"], True).startswith("+")
        shown = caplog.text + repr(oauth2) + repr(oauth2.issued) + repr(oauth2.requests)
        shown += repr(server.sessions) + "\n".join(server.transcripts[0])
    assert "oauth2: POST /token -> 200" in caplog.text  # the log is there, without secrets
    for secret in ("the-secret", code["device_code"], tokens["access_token"],
                   tokens["refresh_token"], auth_code, verifier, challenge, "the-state"):
        assert secret not in shown


@pytest.mark.parametrize("options", [
    {"access_lifetime": 0}, {"refresh_lifetime": -1.0}, {"device_interval": float("nan")},
    {"device_lifetime": float("inf")}, {"approve_after": -1}, {"slow_down_step": -5.0},
    {"host": "0.0.0.0"},
])
def test_options_out_of_range(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeOAuth2(**options)


def test_fractional_lifetimes_are_sent_as_given() -> None:
    with FakeOAuth2(access_lifetime=0.5, device_interval=0.25, device_lifetime=30) as oauth2:
        code = device_code(oauth2)
        assert (code["interval"], code["expires_in"]) == (0.25, 30)
        oauth2.approve()
        assert poll(oauth2, code["device_code"]).json["expires_in"] == 0.5


# ----- the pytest plugin -----------------------------------------------------------------------


def test_plugin_fixture_and_factory(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["fakeserver"]\n')
    pytester.makepyfile(test_user='''
import json, urllib.parse, urllib.request
import pytest
from fakeserver import FakeOAuth2

def token(oauth2):
    oauth2.approve()
    code = json.load(urllib.request.urlopen(urllib.request.Request(oauth2.device_url,
        urllib.parse.urlencode({"client_id": "pop3lite-test"}).encode()), timeout=5))
    form = {"client_id": "pop3lite-test", "device_code": code["device_code"],
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code"}
    return json.load(urllib.request.urlopen(urllib.request.Request(oauth2.token_url,
        urllib.parse.urlencode(form).encode()), timeout=5))

def test_fixture(pop3_oauth2_server):
    oauth2 = pop3_oauth2_server.oauth2
    assert pop3_oauth2_server.preset == "rfc"
    reply = token(oauth2)
    assert reply["expires_in"] == 2 and oauth2.device_interval == 0.05
    assert pop3_oauth2_server.accepts_token("hogehoge", reply["access_token"])

def test_factory(make_pop3_server):
    server = make_pop3_server(user="alice", password="pw", oauth2=FakeOAuth2(user="alice"))
    assert server.accepts_token("alice", token(server.oauth2)["access_token"])

@pytest.mark.pop3_server("rfc", oauth2={"client_id": "mine", "approve_after": 0})
def test_marker(pop3_server):
    assert pop3_server.oauth2.client_id == "mine"
    assert pop3_server.oauth2.approve_after == 0

def test_failure_report(pop3_oauth2_server):
    try:
        urllib.request.urlopen(pop3_oauth2_server.oauth2.token_url, b"x=1", timeout=5)
    except Exception:
        pass
    assert False
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*oauth2 http://127.0.0.1:*: 1 request(s), 0 token reply(ies)",
                                 "*/token - -> invalid_request"])


# ----- the command line ------------------------------------------------------------------------


def test_command_line_oauth2() -> None:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "fakeserver.py"), "--port", "0", "--oauth2", "-q",
         "--oauth2-approve-after", "0", "--oauth2-access-lifetime", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None and process.stderr is not None
    stdout = process.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        out = [lines.get(timeout=20) for _ in range(5)]
        host, _, port = out[0].strip().rpartition(":")
        urls = dict(line.split() for line in out[1:])
        assert set(urls) == {"token-url", "device-url", "auth-url", "client-id"}
        assert urls["client-id"] == CLIENT
        code = post(urls["device-url"], client_id=CLIENT).json
        reply = post(urls["token-url"], grant_type=DEVICE_GRANT, client_id=CLIENT,
                     device_code=code["device_code"]).json
        assert reply["expires_in"] == 30
        token = reply["access_token"]
        assert auth((host, int(port)), "XOAUTH2", "hogehoge", token, False).startswith("+OK")
        rest = [lines.get(timeout=20) for _ in range(6)]
        assert rest[-1] == "stop: Ctrl-C\n"
        assert any(line.startswith("sign in: python pop3lite.py") for line in rest)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        finally:
            process.kill()
        errors = process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0
    assert "Traceback" not in errors


def test_offline_scope_decides_whether_a_refresh_token_comes() -> None:
    with FakeOAuth2(offline_scope="offline_access", approve_after=0) as oauth2:
        without = post(oauth2.device_url, client_id=CLIENT, scope="pop").json
        reply = poll(oauth2, without["device_code"]).json
        assert "refresh_token" not in reply and "access_token" in reply
        tokens = poll(oauth2, device_code(oauth2)["device_code"]).json  # "pop offline_access"
        assert "refresh_token" in tokens
        assert [entry.refresh for entry in oauth2.issued] == [False, True]


def test_verification_page_approves_by_hand() -> None:
    with FakeOAuth2(user="alice", device_interval=0.05) as oauth2:
        code = device_code(oauth2)
        page = request(code["verification_uri"])
        assert page.status == 200 and b"<form method=post>" in page.body
        unknown = post(code["verification_uri"], user_code="BCDF-BCDF")
        assert b"No device code waits" in unknown.body
        assert poll(oauth2, code["device_code"]).error == "authorization_pending"
        time.sleep(0.05)  # the polling interval
        done = post(code["verification_uri"], user_code=code["user_code"].lower())
        assert b"signs in as alice" in done.body
        assert poll(oauth2, code["device_code"]).status == 200
        assert [r.error for r in oauth2.requests if r.path == "/device"] == [
            None, "invalid_request", None]


def test_redirect_uri_with_control_characters_is_refused() -> None:
    with FakeOAuth2() as oauth2:
        for uri in ("http://127.0.0.1:9/\r\nSet-Cookie: x=1", "http://127.0.0.1:9/ a"):
            reply = request(authorize_url(oauth2, uri, pkce()[1]))
            assert reply.status == 400 and "set-cookie" not in reply.headers


def test_approve_and_deny_choose_by_user_code() -> None:
    with FakeOAuth2(device_interval=0.01) as oauth2:
        first, second, third = (device_code(oauth2) for _ in range(3))
        oauth2.approve(first["user_code"], "alice")
        oauth2.deny(second["user_code"])
        assert poll(oauth2, second["device_code"]).error == "access_denied"
        assert poll(oauth2, third["device_code"]).error == "authorization_pending"
        assert poll(oauth2, first["device_code"]).status == 200
        oauth2.approve()  # the latest pending one: the third
        time.sleep(0.01)  # the polling interval
        assert poll(oauth2, third["device_code"]).status == 200
        assert [(entry.user, entry.grant) for entry in oauth2.issued] == [
            ("alice", "device_code"), ("hogehoge", "device_code")]
