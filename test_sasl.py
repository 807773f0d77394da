"""Tests for the SASL mechanisms section of pop3lite.py (RFC vectors, hostile challenges)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

import pop3lite as m

# ---- shared data -------------------------------------------------------------------------

# RFC 5802 section 5 (SCRAM-SHA-1, user "user", password "pencil").
SHA1_NONCE = "fyko+d2lbbFgONRv9qkxdawL"
SHA1_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
SHA1_CLIENT_FINAL = (
    b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
)
SHA1_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="

# RFC 7677 section 3 (SCRAM-SHA-256, same user and password).
SHA256_NONCE = "rOprNGfwEbeRWgbNEkqO"
SHA256_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
SHA256_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SHA256_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

PASSWORD = "pencil-Secret-42"
TOKEN = "ya29.Secret-Token_42"


def sha1_scram(**kwargs: Any) -> m.ScramSHA1Mechanism:
    return m.ScramSHA1Mechanism("user", "pencil", _nonce=SHA1_NONCE, **kwargs)


def sha1_after_first() -> m.ScramSHA1Mechanism:
    mech = sha1_scram()
    mech.initial_response()
    mech.respond(SHA1_SERVER_FIRST)
    return mech


# ---- SCRAM: RFC vectors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "nonce", "server_first", "client_final", "server_final"),
    [
        (m.ScramSHA1Mechanism, SHA1_NONCE, SHA1_SERVER_FIRST, SHA1_CLIENT_FINAL, SHA1_SERVER_FINAL),
        (
            m.ScramSHA256Mechanism,
            SHA256_NONCE,
            SHA256_SERVER_FIRST,
            SHA256_CLIENT_FINAL,
            SHA256_SERVER_FINAL,
        ),
    ],
    ids=["rfc5802-sha1", "rfc7677-sha256"],
)
def test_scram_rfc_example(
    cls: type[m.ScramMechanism],
    nonce: str,
    server_first: bytes,
    client_final: bytes,
    server_final: bytes,
) -> None:
    mech = cls("user", "pencil", _nonce=nonce)
    assert mech.sends_secret is False
    assert mech.initial_response() == b"n,,n=user,r=" + nonce.encode()
    assert mech.respond(server_first) == client_final
    assert mech.respond(server_final) == b""
    mech.finish()  # the server proved it knows the password: no exception


def test_scram_password_is_saslprepped() -> None:
    # SOFT HYPHEN maps to nothing (RFC 4013 section 2.1): same proof as "pencil".
    mech = m.ScramSHA1Mechanism("user", "pen\u00adcil", _nonce=SHA1_NONCE)
    mech.initial_response()
    assert mech.respond(SHA1_SERVER_FIRST) == SHA1_CLIENT_FINAL


def test_scram_user_is_saslprepped_and_escaped() -> None:
    mech = m.ScramSHA256Mechanism("I\u00adX,a=b", "pencil", _nonce=SHA256_NONCE)
    assert mech.initial_response() == b"n,,n=IX=2Ca=3Db,r=" + SHA256_NONCE.encode()


def test_scram_authzid_in_gs2_header_and_channel_binding() -> None:
    mech = m.ScramSHA256Mechanism("user", "pencil", "admin,x=y", _nonce=SHA256_NONCE)
    gs2 = b"n,a=admin=2Cx=3Dy,"
    assert mech.initial_response() == gs2 + b"n=user,r=" + SHA256_NONCE.encode()
    final = mech.respond(SHA256_SERVER_FIRST)
    # c= carries the gs2 header (RFC 5802 section 7, cbind-input without channel binding).
    assert final.startswith(b"c=" + base64.b64encode(gs2) + b",r=")
    assert final != SHA256_CLIENT_FINAL  # the authzid is part of the AuthMessage


def test_scram_random_nonce() -> None:
    first = m.ScramSHA256Mechanism("user", "pencil").initial_response()
    second = m.ScramSHA256Mechanism("user", "pencil").initial_response()
    assert first != second
    nonce = first.split(b",r=", 1)[1]
    assert len(nonce) >= 24
    assert all(0x21 <= byte <= 0x7E and byte != ord(",") for byte in nonce)


def test_scram_server_final_extensions_are_ignored() -> None:
    mech = sha1_after_first()
    assert mech.respond(SHA1_SERVER_FINAL + b",x=future") == b""
    mech.finish()


def test_scram_server_first_extensions_are_ignored() -> None:
    mech = sha1_scram()
    mech.initial_response()
    # An extension changes the AuthMessage, so only check that it is accepted.
    assert mech.respond(SHA1_SERVER_FIRST + b",x=future").startswith(b"c=biws,r=")


def test_scram_drops_password_after_proof() -> None:
    mech = sha1_after_first()
    assert not any(b"pencil" in value for value in vars(mech).values() if isinstance(value, bytes))


# ---- SCRAM: hostile or broken servers ------------------------------------------------------


def test_scram_bad_server_signature() -> None:
    mech = sha1_after_first()
    forged = b"v=" + base64.b64encode(b"\0" * 20)
    with pytest.raises(m.ProtocolError, match="server signature is wrong"):
        mech.respond(forged)
    with pytest.raises(m.ProtocolError):
        mech.finish()


def test_scram_server_signature_of_other_hash_length() -> None:
    mech = sha1_after_first()
    with pytest.raises(m.ProtocolError, match="server signature is wrong"):
        mech.respond(SHA256_SERVER_FINAL)


def test_scram_ok_without_server_final() -> None:
    mech = sha1_after_first()
    with pytest.raises(m.ProtocolError, match="without proving"):
        mech.finish()


def test_scram_ok_before_anything() -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError):
        mech.finish()


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=XXXX+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxda,s=QSXCR+Q6sek8bf92,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc\x7f,s=QSXCR+Q6sek8bf92,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc \xc3\xa9,s=QSXCR+Q6sek8bf92,i=4096",
    ],
    ids=["other-nonce", "no-server-part", "prefix-of-ours", "control-char", "non-ascii"],
)
def test_scram_nonce_must_extend_ours(server_first: bytes) -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError, match="nonce") as info:
        mech.respond(server_first)
    assert info.value.data == server_first[:80]


@pytest.mark.parametrize(
    "count",
    [b"1000001", b"1000000000", b"99999999999999999999999999", b"9" * 5000],
    ids=["just-over-cap", "billion", "huge", "megadigits"],
)
def test_scram_absurd_iteration_count(count: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pbkdf2(*args: object) -> bytes:
        raise AssertionError("PBKDF2 must not run for a rejected count")

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", no_pbkdf2)
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError, match="iteration count"):
        mech.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=" + count)


@pytest.mark.parametrize(
    "count",
    [b"0", b"-1", b"+4096", b"04096", b"4096 ", b"4.5e3", b"", b"\xd9\xa4"],
    ids=["zero", "negative", "plus", "leading-zero", "space", "float", "empty", "arabic-digit"],
)
def test_scram_iteration_count_syntax(count: bytes) -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError, match="iteration count"):
        mech.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=" + count)


@pytest.mark.parametrize("count", [1, 4095])
def test_scram_iteration_count_below_floor(count: int) -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError, match="below the minimum 4096"):
        mech.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=%d" % count)


def test_scram_iteration_floor_can_be_lowered() -> None:
    mech = sha1_scram(min_iterations=1)
    mech.initial_response()
    assert mech.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=1").startswith(
        b"c=biws,"
    )


@pytest.mark.parametrize(
    "limits", [{"min_iterations": 0}, {"min_iterations": 10, "max_iterations": 9}]
)
def test_scram_iteration_limits_checked(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="min_iterations"):
        sha1_scram(**limits)


def test_scram_server_error_in_server_final() -> None:
    mech = sha1_after_first()
    with pytest.raises(m.AuthenticationError, match="invalid-proof") as caught:
        mech.respond(b"e=invalid-proof")
    # The refusal came inside the exchange, not as a -ERR line: the message must not say so.
    assert "-ERR" not in str(caught.value)
    assert str(caught.value) == "server rejected SCRAM authentication: invalid-proof"
    with pytest.raises(m.ProtocolError):
        mech.finish()


def test_scram_server_error_in_server_first() -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.AuthenticationError, match="unknown-user"):
        mech.respond(b"e=unknown-user")


def test_scram_mandatory_extension() -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError, match="unsupported extension"):
        mech.respond(b"m=future," + SHA1_SERVER_FIRST)


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,i=4096",
        b"s=QSXCR+Q6sek8bf92,r=fyko+d2lbbFgONRv9qkxdawL3rfc,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4096,",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4096,junk",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf9,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92=,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf9!,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=,i=4096",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4096\xff",
    ],
    ids=[
        "empty",
        "no-salt",
        "wrong-order",
        "trailing-comma",
        "trailing-junk",
        "salt-bad-padding",
        "salt-extra-padding",
        "salt-bad-alphabet",
        "salt-empty",
        "not-utf8",
    ],
)
def test_scram_malformed_server_first(server_first: bytes) -> None:
    mech = sha1_scram()
    mech.initial_response()
    with pytest.raises(m.ProtocolError):
        mech.respond(server_first)
    with pytest.raises(m.ProtocolError):  # a failed exchange stays failed
        mech.finish()


@pytest.mark.parametrize(
    "server_final",
    [b"", b"x=1", b"v=not*base64", b"v=", b"r=foo", b"v"],
    ids=["empty", "unknown-attr", "bad-base64", "empty-v", "wrong-attr", "no-equals"],
)
def test_scram_malformed_server_final(server_final: bytes) -> None:
    mech = sha1_after_first()
    with pytest.raises(m.ProtocolError):
        mech.respond(server_final)


def test_scram_challenge_after_success() -> None:
    mech = sha1_after_first()
    mech.respond(SHA1_SERVER_FINAL)
    with pytest.raises(m.ProtocolError, match="unexpected"):
        mech.respond(b"")


def test_scram_server_first_fed_byte_by_byte_prefixes_fail() -> None:
    # Every proper prefix of the server-first message is invalid on its own (a transport
    # that handed over a partial challenge would be caught, not answered).
    for end in range(len(SHA1_SERVER_FIRST)):
        mech = sha1_scram()
        mech.initial_response()
        with pytest.raises(m.ProtocolError):
            mech.respond(SHA1_SERVER_FIRST[:end])


@pytest.mark.parametrize(
    "nonce", ["", "a,b", "caf\u00e9", "with space"], ids=["empty", "comma", "non-ascii", "space"]
)
def test_scram_test_nonce_is_checked(nonce: str) -> None:
    with pytest.raises(ValueError, match="_nonce"):
        m.ScramSHA1Mechanism("user", "pencil", _nonce=nonce)


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("user", "Secret\u0007pw", "password contains a character that SASLprep prohibits"),
        ("us\u0007er", PASSWORD, "user name contains a character that SASLprep prohibits"),
        ("\u00ad", PASSWORD, "user name after SASLprep is empty"),
        ("user", "Secret\ud800pw", "password contains a character that SASLprep prohibits"),
        ("user", "\u0627Secret1", "password mixes text directions"),
    ],
    ids=["control-in-password", "control-in-user", "user-empty-after-prep", "surrogate", "bidi"],
)
def test_scram_bad_credentials(user: str, password: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        m.ScramSHA256Mechanism(user, password)
    assert "Secret" not in str(info.value)
    # Not chained to an exception that holds the password (UnicodeEncodeError.object).
    assert info.value.__context__ is None


# ---- CRAM-MD5, PLAIN, LOGIN ----------------------------------------------------------------


def test_cram_md5_rfc2195_example() -> None:
    mech = m.CramMD5Mechanism("tim", "tanstaaftanstaaf")
    assert mech.sends_secret is False
    assert mech.initial_response() is None
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert mech.respond(challenge) == b"tim b913a602c7eda7a495b4e6e7334d3890"
    mech.finish()


def test_cram_md5_one_challenge_only() -> None:
    mech = m.CramMD5Mechanism("tim", "tanstaaftanstaaf")
    mech.respond(b"<1.2@host>")
    with pytest.raises(m.ProtocolError):
        mech.respond(b"<1.2@host>")


def test_cram_md5_empty_challenge() -> None:
    with pytest.raises(m.ProtocolError):
        m.CramMD5Mechanism("tim", "tanstaaftanstaaf").respond(b"")


def test_cram_md5_without_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "_md5_usable", lambda: False)
    with pytest.raises(ValueError, match="FIPS"):
        m.CramMD5Mechanism("tim", "tanstaaftanstaaf")


@pytest.mark.parametrize(
    ("authzid", "user", "password", "expected"),
    [
        ("", "tim", "tanstaaftanstaaf", b"\0tim\0tanstaaftanstaaf"),  # RFC 4616 section 4
        ("Ursel", "Kurt", "xipj3plmq", b"Ursel\0Kurt\0xipj3plmq"),  # RFC 4616 section 4
        ("", "j\u00f6rg", "p\u00e4ss", "\0j\u00f6rg\0p\u00e4ss".encode()),  # UTF-8, as is
    ],
    ids=["rfc4616-1", "rfc4616-2", "utf8"],
)
def test_plain(authzid: str, user: str, password: str, expected: bytes) -> None:
    mech = m.PlainMechanism(user, password, authzid)
    assert mech.sends_secret is True
    assert mech.initial_response() == expected
    mech.finish()


def test_plain_rejects_challenge() -> None:
    with pytest.raises(m.ProtocolError):
        m.PlainMechanism("tim", "tanstaaftanstaaf").respond(b"more?")


@pytest.mark.parametrize(
    ("user", "password", "authzid"),
    [
        ("tim", "Secret\0x", ""),
        ("t\0m", "Secret", ""),
        ("tim", "Secret", "a\0b"),
        ("tim", "", ""),
        ("tim", "Secret\ud800", ""),
    ],
    ids=["nul-password", "nul-user", "nul-authzid", "empty-password", "surrogate"],
)
def test_plain_bad_arguments(user: str, password: str, authzid: str) -> None:
    with pytest.raises(ValueError) as info:
        m.PlainMechanism(user, password, authzid)
    assert "Secret" not in str(info.value)
    # Not chained to an exception that holds the password (UnicodeEncodeError.object).
    assert info.value.__context__ is None


@pytest.mark.parametrize(
    "prompts",
    [
        (b"Username:", b"Password:"),
        (b"User Name\0", b"Password\0"),
        (b"", b""),
        ("Nom d\u2019utilisateur\u00a0:".encode(), "Mot de passe\u00a0:".encode()),
        (b"Password:", b"Username:"),  # order, not text, decides
    ],
    ids=["usual", "nul-terminated", "empty", "localised", "misleading"],
)
def test_login_answers_by_order(prompts: tuple[bytes, bytes]) -> None:
    mech = m.LoginMechanism("tim", "tanstaaf\u00e9")
    assert mech.sends_secret is True
    assert mech.initial_response() is None
    assert mech.respond(prompts[0]) == b"tim"
    assert mech.respond(prompts[1]) == "tanstaaf\u00e9".encode()
    with pytest.raises(m.ProtocolError, match="third"):
        mech.respond(b"Again:")
    mech.finish()


# ---- XOAUTH2 and OAUTHBEARER ---------------------------------------------------------------

GOOGLE_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}


def test_xoauth2_initial_response() -> None:
    mech = m.XOAuth2Mechanism("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3Rl")
    assert mech.sends_secret is True
    assert mech.initial_response() == (
        b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3Rl\x01\x01"
    )
    assert mech.error_details is None
    mech.finish()


def test_xoauth2_error_challenge() -> None:
    mech = m.XOAuth2Mechanism("someuser@example.com", TOKEN)
    mech.initial_response()
    assert mech.respond(json.dumps(GOOGLE_ERROR).encode()) == b""
    assert mech.error_details == GOOGLE_ERROR
    with pytest.raises(m.ProtocolError, match="after the error"):
        mech.respond(json.dumps(GOOGLE_ERROR).encode())


@pytest.mark.parametrize(
    "challenge",
    [b"", b"not json", b"[1, 2]", b'"401"', b'{"status": "401"', b'{"a": "\xff"}'],
    ids=["empty", "text", "list", "string", "truncated", "not-utf8"],
)
@pytest.mark.parametrize("cls", [m.XOAuth2Mechanism, m.OAuthBearerMechanism])
def test_oauth_bad_error_challenge(cls: type[m.Mechanism], challenge: bytes) -> None:
    mech = cls("someuser@example.com", TOKEN)  # type: ignore[call-arg]
    mech.initial_response()
    with pytest.raises(m.ProtocolError, match="JSON"):
        mech.respond(challenge)


def test_oauthbearer_rfc7628_example() -> None:
    # RFC 7628 section 4.1: the initial response, as the base64 the RFC shows.
    expected = base64.b64decode(
        "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVy"
        "IHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
    )
    mech = m.OAuthBearerMechanism(
        "user@example.com",
        "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        host="server.example.com",
        port=143,
    )
    assert mech.sends_secret is True
    assert mech.initial_response() == expected
    mech.finish()


def test_oauthbearer_rfc7628_failed_exchange() -> None:
    # RFC 7628 section 4.3: the error challenge is answered with %x01.
    challenge = base64.b64decode(
        "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3Vy"
        "YXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0="
    )
    mech = m.OAuthBearerMechanism("user@example.com", TOKEN, host="server.example.com", port=143)
    mech.initial_response()
    assert mech.respond(challenge) == b"\x01"
    assert mech.error_details == {
        "status": "invalid_token",
        "scope": "example_scope",
        "openid-configuration": "https://example.com/.well-known/openid-configuration",
    }
    with pytest.raises(m.ProtocolError, match="after the error"):
        mech.respond(challenge)


@pytest.mark.parametrize(
    ("user", "authzid", "expected"),
    [
        ("user@example.com", "", b"n,a=user@example.com,\x01auth=Bearer T0k\x01\x01"),
        ("a,b=c", "", b"n,a=a=2Cb=3Dc,\x01auth=Bearer T0k\x01\x01"),
        ("user", "shared@example.com", b"n,a=shared@example.com,\x01auth=Bearer T0k\x01\x01"),
    ],
    ids=["no-host-port", "escaped", "authzid"],
)
def test_oauthbearer_variants(user: str, authzid: str, expected: bytes) -> None:
    assert m.OAuthBearerMechanism(user, "T0k", authzid).initial_response() == expected


@pytest.mark.parametrize("port", [0, 65536, -1, True], ids=["zero", "too-big", "negative", "bool"])
def test_oauthbearer_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        m.OAuthBearerMechanism("user", TOKEN, port=port)


@pytest.mark.parametrize(
    "token",
    ["", TOKEN + "\x01", TOKEN + " x", TOKEN + "\r\n", TOKEN + "\u00e9"],
    ids=["empty", "kvsep", "space", "crlf", "non-ascii"],
)
@pytest.mark.parametrize("cls", [m.XOAuth2Mechanism, m.OAuthBearerMechanism])
def test_oauth_bad_token(cls: type[m.Mechanism], token: str) -> None:
    with pytest.raises(ValueError, match="token") as info:
        cls("user", token)  # type: ignore[call-arg]
    assert "Secret" not in str(info.value)


def test_oauth_bad_user() -> None:
    with pytest.raises(ValueError, match="user name"):
        m.XOAuth2Mechanism("a\x01b", TOKEN)
    with pytest.raises(ValueError, match="user name"):
        m.OAuthBearerMechanism("a\x01b", TOKEN)
    with pytest.raises(ValueError, match="host"):
        m.OAuthBearerMechanism("user", TOKEN, host="evil\x01auth=x")


# ---- SASLprep (RFC 4013) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I\u00adX", "IX"),  # RFC 4013 section 3, 1: SOFT HYPHEN mapped to nothing
        ("user", "user"),  # 2: no transformation
        ("USER", "USER"),  # 3: case preserved
        ("\u00aa", "a"),  # 4: output is NFKC
        ("\u2168", "IX"),  # 5: output is NFKC
        ("a\u00a0b\u3000c", "a b c"),  # section 2.1: non-ASCII spaces map to SPACE
        ("\ufb01x", "fix"),  # NFKC of a ligature
        ("\u0627\u0628", "\u0627\u0628"),  # all right-to-left
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # RFC 3454 section 6: RandAL at both ends
        ("", ""),
    ],
    ids=[
        "soft-hyphen",
        "user",
        "USER",
        "ordinal",
        "roman-nine",
        "spaces",
        "ligature",
        "rtl",
        "rtl-digit-inside",
        "empty",
    ],
)
def test_saslprep(text: str, expected: str) -> None:
    assert m.saslprep(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\u0007", "prohibits"),  # RFC 4013 section 3, 6: prohibited character
        ("\u0627\u0031", "directions"),  # 7: bidirectional check
        ("a\u0627", "directions"),  # LCat with RandALCat
        ("x\u0085", "prohibits"),  # C.2.2 non-ASCII control
        ("\ue000", "prohibits"),  # C.3 private use
        ("\ufffe", "prohibits"),  # C.4 non-character
        ("\ufff9", "prohibits"),  # C.6 inappropriate for plain text
        ("\u2ff0", "prohibits"),  # C.7 ideographic description
        ("\u200e", "prohibits"),  # C.8 LEFT-TO-RIGHT MARK
        ("\U000e0001", "prohibits"),  # C.9 tagging
    ],
    ids=["bell", "rtl-then-digit", "mixed", "c22", "c3", "c4", "c6", "c7", "c8", "c9"],
)
def test_saslprep_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        m.saslprep(text)


def test_saslprep_unassigned() -> None:
    # U+0221 was unassigned in Unicode 3.2 (table A.1): allowed in query strings only.
    assert m.saslprep("x\u0221") == "x\u0221"
    with pytest.raises(ValueError, match="prohibits"):
        m.saslprep("x\u0221", allow_unassigned=False)


def test_saslprep_error_does_not_echo_input() -> None:
    with pytest.raises(ValueError) as info:
        m.saslprep("Secret\u0007", what="password")
    assert str(info.value) == "password contains a character that SASLprep prohibits"


# ---- factory, choice, reprs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "sends_secret"),
    [
        ("PLAIN", m.PlainMechanism, True),
        ("login", m.LoginMechanism, True),
        ("Cram-Md5", m.CramMD5Mechanism, False),
        ("scram-sha-1", m.ScramSHA1Mechanism, False),
        ("SCRAM-SHA-256", m.ScramSHA256Mechanism, False),
    ],
)
def test_mechanism_for_password(name: str, cls: type[m.Mechanism], sends_secret: bool) -> None:
    mech = m.mechanism_for(name, "tim", PASSWORD)
    assert type(mech) is cls
    assert mech.name == name.upper()
    assert mech.sends_secret is sends_secret
    with pytest.raises(ValueError, match="needs a password"):
        m.mechanism_for(name, "tim", token=TOKEN)


@pytest.mark.parametrize(
    ("name", "cls"), [("xoauth2", m.XOAuth2Mechanism), ("OAuthBearer", m.OAuthBearerMechanism)]
)
def test_mechanism_for_token(name: str, cls: type[m.Mechanism]) -> None:
    mech = m.mechanism_for(name, "tim", token=TOKEN)
    assert type(mech) is cls
    assert mech.sends_secret is True
    with pytest.raises(ValueError, match="needs a token"):
        m.mechanism_for(name, "tim", PASSWORD)


def test_mechanism_for_passes_authzid_host_port() -> None:
    plain = m.mechanism_for("PLAIN", "tim", PASSWORD, authzid="boss")
    assert plain.initial_response() == b"boss\0tim\0" + PASSWORD.encode()
    scram = m.mechanism_for("SCRAM-SHA-256", "tim", PASSWORD, authzid="boss")
    assert (scram.initial_response() or b"").startswith(b"n,a=boss,n=tim,r=")
    bearer = m.mechanism_for("OAUTHBEARER", "tim", token="T0k", authzid="boss", host="h", port=995)
    expected = b"n,a=boss,\x01host=h\x01port=995\x01auth=Bearer T0k\x01\x01"
    assert bearer.initial_response() == expected


@pytest.mark.parametrize("name", ["LOGIN", "CRAM-MD5", "XOAUTH2"])
def test_mechanism_for_refuses_authzid(name: str) -> None:
    with pytest.raises(ValueError, match="authorization identity"):
        m.mechanism_for(name, "tim", PASSWORD, TOKEN, authzid="boss")


@pytest.mark.parametrize(
    "name",
    ["GSSAPI", "SCRAM-SHA-256-PLUS", "", "\u017fcram-sha-256", "PLAIN "],
    ids=["gssapi", "plus", "empty", "long-s", "trailing-space"],
)
def test_mechanism_for_unknown(name: str) -> None:
    with pytest.raises(ValueError, match="unsupported SASL mechanism"):
        m.mechanism_for(name, "tim", PASSWORD, TOKEN)


def test_mechanism_for_empty_user() -> None:
    with pytest.raises(ValueError, match="user name is empty"):
        m.mechanism_for("PLAIN", "", PASSWORD)


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"], "SCRAM-SHA-256"),
        (["PLAIN", "SCRAM-SHA-1", "CRAM-MD5"], "SCRAM-SHA-1"),
        (["LOGIN", "PLAIN", "CRAM-MD5"], "CRAM-MD5"),
        (["LOGIN", "PLAIN"], "PLAIN"),
        (["LOGIN"], "LOGIN"),
        (["scram-sha-256", "plain"], "SCRAM-SHA-256"),
        (["XOAUTH2", "OAUTHBEARER", "GSSAPI"], None),
        (["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"], None),
        ([], None),
        ("LOGIN PLAIN CRAM-MD5", "CRAM-MD5"),
        (iter(["PLAIN", "SCRAM-SHA-1"]), "SCRAM-SHA-1"),
    ],
    ids=[
        "all",
        "sha1",
        "cram",
        "plain",
        "login",
        "lower-case",
        "tokens-only",
        "plus-only",
        "none",
        "string",
        "iterator",
    ],
)
def test_choose_password_mechanism(offered: Any, expected: str | None) -> None:
    assert m.choose_password_mechanism(offered) == expected


def test_choose_password_mechanism_skips_cram_md5_without_md5(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(m, "_md5_usable", lambda: False)
    assert m.choose_password_mechanism(["CRAM-MD5", "PLAIN"]) == "PLAIN"


def test_strength_order() -> None:
    assert m.PASSWORD_MECHANISMS_BY_STRENGTH == (
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "PLAIN",
        "LOGIN",
    )
    assert set(m.SUPPORTED_MECHANISMS) == set(m.PASSWORD_MECHANISMS_BY_STRENGTH) | {
        "XOAUTH2",
        "OAUTHBEARER",
    }


@pytest.mark.parametrize("name", m.SUPPORTED_MECHANISMS)
def test_repr_shows_name_and_user_only(name: str) -> None:
    mech = m.mechanism_for(name, "tim", PASSWORD, TOKEN)
    shown = repr(mech)
    assert shown == f"<{type(mech).__name__} {name} user='tim'>"
    assert str(mech) == shown
    assert "Secret" not in shown


def test_exception_messages_hold_no_secrets() -> None:
    # Drive every failure path of SCRAM with a password that would be easy to spot.
    messages = []
    for challenge in (b"e=invalid-proof", b"v=" + base64.b64encode(b"x" * 20), b"junk"):
        mech = m.ScramSHA1Mechanism("user", PASSWORD, _nonce=SHA1_NONCE)
        mech.initial_response()
        mech.respond(SHA1_SERVER_FIRST)
        with pytest.raises(m.Error) as info:
            mech.respond(challenge)
        messages.append(str(info.value))
        with pytest.raises(m.Error) as info:
            mech.finish()
        messages.append(str(info.value))
    assert len(messages) == 6
    assert not any("Secret" in text or "pencil" in text for text in messages)


# ---- SaslExchange: the AUTH exchange without I/O ---------------------------------------------


def test_exchange_scram_rfc5802_vector() -> None:
    exchange = m.SaslExchange(sha1_scram())
    name, first = exchange.arguments
    assert name == "SCRAM-SHA-1"
    assert base64.b64decode(first) == b"n,,n=user,r=" + SHA1_NONCE.encode()
    answer = exchange.answer(base64.b64encode(SHA1_SERVER_FIRST))
    assert base64.b64decode(answer) == SHA1_CLIENT_FINAL
    assert exchange.answer(base64.b64encode(SHA1_SERVER_FINAL)) == b""
    assert exchange.finish(True, b"welcome") == b"welcome"


def test_exchange_initial_response_moves_off_a_long_auth_line() -> None:
    # RFC 5034 section 4: the AUTH line with its initial response must fit in 255 octets.
    short = m.SaslExchange(m.PlainMechanism("u", "p"))
    assert len(short.arguments) == 2
    long = m.SaslExchange(m.PlainMechanism("u", "p" * 200))
    assert long.arguments == ("PLAIN",)
    assert base64.b64decode(long.answer(b"")) == b"\0u\0" + b"p" * 200


def test_exchange_empty_initial_response_is_an_equals_sign() -> None:
    class Empty(m.Mechanism):
        name = "X-EMPTY"

        def initial_response(self) -> bytes:
            return b""

    assert m.SaslExchange(Empty("u")).arguments == ("X-EMPTY", "=")


@pytest.mark.parametrize(
    ("challenge", "error"),
    [
        (b"not base64!", m.ProtocolError),
        (base64.b64encode(b"e=other-error"), m.AuthenticationError),
    ],
    ids=["not base64", "scram e="],
)
def test_exchange_cancels_with_a_star_and_raises_after_the_err(
    challenge: bytes, error: type
) -> None:
    exchange = m.SaslExchange(sha1_scram())
    if error is m.AuthenticationError:  # e= comes in place of the server-final message
        exchange.answer(base64.b64encode(SHA1_SERVER_FIRST))
    assert exchange.answer(challenge) == b"*"
    assert exchange.cancelled
    with pytest.raises(error):
        exchange.finish(False, b"cancelled")


def test_exchange_plus_ok_after_a_cancel_is_a_protocol_error() -> None:
    exchange = m.SaslExchange(m.PlainMechanism("u", "p"))
    assert exchange.answer(b"junk!") == b"*"
    with pytest.raises(m.ProtocolError, match="accepted a cancelled AUTH"):
        exchange.finish(True, b"")


def test_exchange_refusal_is_an_authentication_error_with_the_oauth_details() -> None:
    exchange = m.SaslExchange(m.XOAuth2Mechanism("u", TOKEN))
    error_json = json.dumps({"status": "401", "schemes": "Bearer"}).encode()
    assert exchange.answer(base64.b64encode(error_json)) == b""
    with pytest.raises(m.AuthenticationError) as caught:
        exchange.finish(False, b"[AUTH] invalid credentials")
    assert caught.value.details == {"status": "401", "schemes": "Bearer"}
    assert caught.value.code == "AUTH"


def test_exchange_scram_ok_without_proof_is_refused() -> None:
    exchange = m.SaslExchange(sha1_scram())
    exchange.answer(base64.b64encode(SHA1_SERVER_FIRST))
    with pytest.raises(m.ProtocolError, match="without proving"):
        exchange.finish(True, b"")


def test_exchange_stops_an_endless_series_of_challenges() -> None:
    class Patient(m.Mechanism):
        name = "X-PATIENT"

        def respond(self, challenge: bytes) -> bytes:
            return b"again"

    exchange = m.SaslExchange(Patient("u"))
    for _ in range(m.MAX_SASL_ROUNDS):
        assert exchange.answer(base64.b64encode(b"more?")) == base64.b64encode(b"again")
    with pytest.raises(m.ProtocolError, match="kept sending"):
        exchange.answer(base64.b64encode(b"more?"))


def test_exchange_refuses_a_challenge_after_the_cancel() -> None:
    # RFC 5034 section 4: the server MUST answer "*" with -ERR; another challenge after it
    # must not get a real answer (LOGIN would send the password next).
    exchange = m.SaslExchange(m.LoginMechanism("u", PASSWORD))
    assert exchange.answer(b"!") == b"*"
    with pytest.raises(m.ProtocolError, match="after the client cancelled"):
        exchange.answer(base64.b64encode(b"Password:"))
