#!/usr/bin/env bash
# tools/interop.sh: try pop3lite.py against a real POP3 server, and fakeserver.py against real
# POP3 clients that nobody here wrote. "Follow the RFCs, not the tests you wrote yourself."
#
# A developer tool, NOT run by CI: it takes a few minutes, needs root and Debian's apt-get (it
# installs dovecot-pop3d, fetchmail, mpop, getmail6, curl and openssl when they are missing, and
# what parts C and D need: see tools/interop_more.sh).
#
#   A. Dovecot (its own instance, in the foreground, private config, 127.0.0.1 on free high
#      ports: plain+STLS and implicit TLS; self-signed CA and "localhost" certificate made here
#      with openssl) vs pop3lite's API and command line, and CPython's poplib as a reference.
#   B. fakeserver.py (command line, --port 0, both presets, plain/STLS/implicit TLS) vs
#      curl, fetchmail, mpop, getmail6 and openssl s_client.
#   C. pop3lite vs popa3d, GNU Mailutils pop3d and Courier pop3d; D. fakeserver.py vs Perl's
#      Net::POP3, Ruby's net-pop, s-nail, NeoMutt and PHP's imap: tools/interop_more.sh, which
#      this script sources (it creates the system users p3linterop and popa3d).
#
# Usage:  sudo bash tools/interop.sh [--keep]
#   --keep   keep the work directory (configs, logs, transcripts) even when everything passed
#   INTEROP_WORK=DIR   use DIR as the work directory (default: a new /tmp/pop3lite-interop.*)
#   INTEROP_DEBUG=1    print Python tracebacks of failed checks
# Known FAILs: none at the last run (the README's "Tried with real peers" says what was met).
# NOTE lines report what a real peer did that our own tests assume never happens.
# Output: one "PASS name" or "FAIL name: why" line per check, then a summary. Exit status 0 when
# every check passed, 1 otherwise (2: could not set up). Loopback only (127.0.0.1); every wait is
# bounded; every process it starts is stopped at exit.
set -u
export LC_ALL=C.UTF-8

REPO=$(cd "$(dirname "$0")/.." && pwd)
export REPO
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
WORK=${INTEROP_WORK:-$(mktemp -d /tmp/pop3lite-interop.XXXXXX)}
mkdir -p "$WORK"
chmod 755 "$WORK"
PY=${PYTHON:-python3}
PIDS=()
PASSES=0
FAILS=0
FAILED=()

pass() { PASSES=$((PASSES + 1)); echo "PASS $1"; }
fail() { FAILS=$((FAILS + 1)); FAILED+=("$1"); echo "FAIL $1${2:+: $2}"; }
# check NAME COMMAND...: PASS when the command exits 0, else FAIL with its last output line
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ' | cut -c1-400)"; fi
}

cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do
        kill -INT "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ "$KEEP" = 1 ] || [ "$FAILS" -gt 0 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "interop.sh: $*" >&2; exit 2; }
# parts C and D: functions only, called below
. "$REPO/tools/interop_more.sh"

# count_results NAME STATUS RESULTS STDERR: show a Python checker's lines and count its PASS and
# FAIL lines; a checker that failed without a FAIL line is a FAIL of its own
count_results() {
    local line
    cat "$3"
    PASSES=$((PASSES + $(grep -c '^PASS ' "$3")))
    while IFS= read -r line; do
        FAILS=$((FAILS + 1))
        FAILED+=("${line#FAIL }")
    done < <(grep '^FAIL ' "$3")
    if [ "$2" != 0 ] && ! grep -q '^FAIL ' "$3"; then
        fail "$1" "exit $2: $(tail -n 3 "$4" | tr '\n' ' ')"
    fi
}

# wait_for CONDITION-COMMAND... : up to 10 s
wait_for() {
    local i
    for i in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}
port_open() { "$PY" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$1"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------------------------------------
# Install what is missing
# ---------------------------------------------------------------------------------------------
need=()
command -v dovecot >/dev/null || need+=(dovecot-pop3d)
command -v fetchmail >/dev/null || need+=(fetchmail)
command -v mpop >/dev/null || need+=(mpop)
command -v getmail >/dev/null || need+=(getmail6)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v setpriv >/dev/null || need+=(util-linux)
# shellcheck disable=SC2207  # package names, no spaces
need+=($(more_packages))
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "run as root: apt-get must install ${need[*]}"
    echo "installing: ${need[*]}"
    timeout 600 apt-get update -qq >"$WORK/apt.log" 2>&1 || die "apt-get update failed (see $WORK/apt.log)"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q "${need[@]}" >>"$WORK/apt.log" 2>&1 \
        || die "apt-get install failed (see $WORK/apt.log)"
    if [[ " ${need[*]} " == *" dovecot-pop3d "* ]]; then
        # The package may start a system-wide Dovecot: this script runs its own instance.
        if [ -d /run/systemd/system ]; then
            systemctl disable --now dovecot.service dovecot.socket >/dev/null 2>&1
        else
            service dovecot stop >/dev/null 2>&1
            update-rc.d dovecot disable >/dev/null 2>&1
        fi
    fi
fi
[ "$(id -u)" = 0 ] || die "run as root (Dovecot drops privileges to run the test mailbox as nobody)"
echo "versions: $(dovecot --version | cut -d' ' -f1) (dovecot), $(fetchmail --version 2>/dev/null | sed -n 's/.*release \([^+ ]*\).*/\1/p' | head -n1) (fetchmail)," \
    "$(mpop --version | head -n1 | cut -d' ' -f3) (mpop), $(getmail --version 2>&1 | cut -d' ' -f2) (getmail6)," \
    "$(curl -V | head -n1 | cut -d' ' -f2) (curl), $(openssl version | cut -d' ' -f2) (openssl), $("$PY" -c 'import sys; print(sys.version.split()[0])') (python)"
curl -V | grep -q '^Protocols:.* pop3s' || die "this curl has no pop3/pop3s support"

# ---------------------------------------------------------------------------------------------
# Test CA and "localhost" certificate for Dovecot
# ---------------------------------------------------------------------------------------------
mkdir -p "$WORK/tls"
cat >"$WORK/tls/ca.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = pop3lite interop test CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
cat >"$WORK/tls/leaf.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = localhost
[v3_leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
CNF
(
    cd "$WORK/tls" &&
        openssl req -x509 -new -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -config ca.cnf &&
        openssl req -new -newkey rsa:2048 -nodes -keyout server.key -out server.csr -config leaf.cnf &&
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
            -days 2 -extfile leaf.cnf -extensions v3_leaf &&
        openssl verify -CAfile ca.pem server.pem
) >"$WORK/tls/openssl.log" 2>&1 || die "certificate generation failed (see $WORK/tls/openssl.log)"
CA=$WORK/tls/ca.pem

# ---------------------------------------------------------------------------------------------
# Part A: pop3lite (and poplib) against Dovecot
# ---------------------------------------------------------------------------------------------
echo "== A: pop3lite and poplib against Dovecot"
DV=$WORK/dovecot
mkdir -p "$DV/run" "$DV/state" "$DV/home/tester" "$WORK/a"
DV_USER=tester
DV_PASSWORD=interop-Pa55
DV_PLAIN=$(free_port)
DV_TLS=$(free_port)
[ "$DV_PLAIN" != "$DV_TLS" ] || DV_TLS=$(free_port)
printf '%s:{PLAIN}%s::::%s::\n' "$DV_USER" "$DV_PASSWORD" "$DV/home/tester" >"$DV/passwd"
chmod 644 "$DV/passwd"
cat >"$DV/mkmail.py" <<'PYEOF'
"""Write the interop test messages into a Maildir and a manifest of the bytes a POP3 server should send."""
import json, os, sys, time

maildir = sys.argv[1]
for sub in ("new", "cur", "tmp"):
    os.makedirs(os.path.join(maildir, sub), exist_ok=True)

def header(subject, extra=b""):
    return (b"From: Interop Sender <sender@example.org>\n"
            b"To: tester@example.org\n"
            b"Date: Wed, 26 Nov 2025 10:00:00 +0000\n"
            b"Message-ID: <" + subject.encode("ascii", "replace").replace(b" ", b"-") + b"@interop.example>\n"
            b"Subject: " + subject.encode() + b"\n" + extra)

messages = []
# 1 plain ASCII
messages.append(("ascii", header("plain ascii") + b"\nHello.\nSecond line.\n"))
# 2 dot lines
messages.append(("dots", header("dot lines") + b"\n.\n..\n.hidden\n...three\n. space\nend.\n.\n"))
# 3 8-bit UTF-8 header (RFC 6532 style) and body
messages.append(("utf8", ("From: Jos\u00e9 <jose@example.org>\nTo: tester@example.org\n"
                          "Date: Wed, 26 Nov 2025 10:00:00 +0000\nMessage-ID: <utf8@interop.example>\n"
                          "Subject: \u65e5\u672c\u8a9e\u306e\u4ef6\u540d caf\u00e9\n"
                          "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                          "Content-Transfer-Encoding: 8bit\n\n\u3053\u3093\u306b\u3061\u306f \u00fcml\u00e4ut\n").encode("utf-8")))
# 4 CRLF already in the file
messages.append(("crlf", header("crlf stored").replace(b"\n", b"\r\n") + b"\r\nCRLF body\r\n.dot\r\n"))
# 5 mixed CRLF and bare LF
messages.append(("mixed", header("mixed line ends") + b"\nlf line\r\ncrlf line\nlf again\n"))
# 6 no final newline
messages.append(("nofinal", header("no final newline") + b"\nlast line without newline"))
# 7 large ~10 MB, with dot lines sprinkled in
line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"
body = bytearray()
i = 0
while len(body) < 10 * 2**20:
    body += (b"." if i % 1000 == 0 else b"") + line
    i += 1
messages.append(("large", header("large message") + b"\n" + bytes(body)))

def crlf(data):
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

now = int(time.time())
manifest = []
for i, (name, data) in enumerate(messages, 1):
    fn = "%d.M%dP%d.interop" % (now + i, i, os.getpid())
    with open(os.path.join(maildir, "new", fn), "wb") as f:
        f.write(data)
    os.utime(os.path.join(maildir, "new", fn), (now + i, now + i))
    want = crlf(data)
    # A POP3 server must end the message with CRLF before the terminating "."; Dovecot adds
    # that CRLF to a file without a final newline, but its LIST size does not count it.
    listed = len(want)
    if not want.endswith(b"\r\n"):
        want += b"\r\n"
    manifest.append({"name": name, "file": fn, "expected": want.hex(), "listed": listed})
with open(sys.argv[2], "w") as f:
    json.dump(manifest, f)
PYEOF
"$PY" "$DV/mkmail.py" "$DV/home/tester/Maildir" "$WORK/a/manifest.json" || die "could not write the test Maildir"
chown -R 65534:65534 "$DV/home"
# Plaintext passwords in the passwd-file let every mechanism (SCRAM, CRAM-MD5, APOP) work.
# auth_failure_delay 0: the wrong-password checks need not wait 2 s each.
cat >"$DV/dovecot.conf" <<CONF
protocols = pop3
listen = 127.0.0.1
base_dir = $DV/run
state_dir = $DV/state
instance_name = pop3lite-interop-$$
log_path = $DV/dovecot.log
auth_verbose = yes
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
ssl = yes
ssl_cert = <$WORK/tls/server.pem
ssl_key = <$WORK/tls/server.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login cram-md5 scram-sha-1 scram-sha-256 apop
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $DV/passwd
}
userdb {
  driver = passwd-file
  args = username_format=%u $DV/passwd
  default_fields = uid=65534 gid=65534 mail=maildir:~/Maildir
}
pop3_uidl_format = %08Xu%08Xv
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $DV_PLAIN
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $DV_TLS
    ssl = yes
  }
}
service anvil {
  chroot =
}
CONF
doveconf -c "$DV/dovecot.conf" -n >"$DV/doveconf.txt" 2>&1 || die "doveconf rejected the config (see $DV/doveconf.txt)"
dovecot -F -c "$DV/dovecot.conf" >"$DV/dovecot.out" 2>&1 &
PIDS+=($!)
wait_for port_open "$DV_PLAIN" && wait_for port_open "$DV_TLS" || die "Dovecot did not start (see $DV/dovecot.log)"
echo "dovecot: 127.0.0.1:$DV_PLAIN (plain, STLS) and 127.0.0.1:$DV_TLS (implicit TLS), user $DV_USER"
cat >"$WORK/interop_check.py" <<'PYEOF'
"""PASS/FAIL/NOTE lines for the Python checks of tools/interop.sh (check_a.py, check_c.py)."""
import os
import sys
import traceback
import warnings

PREFIX = []  # what goes before every check name ("A:"), set by the checker
failures = 0
notes = []


def result(name, ok, why=""):
    global failures
    name = "".join(PREFIX) + name
    if ok:
        print("PASS " + name, flush=True)
    else:
        failures += 1
        print("FAIL " + name + (": " + why if why else ""), flush=True)


def check(name):
    """Decorator: run the function now; PASS if it returns None/True, FAIL on False, a text or an
    exception. Each warning becomes a NOTE, once (some come in every session)."""

    def run(fn):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = fn()
            for w in caught:
                text = "warning %s: %s" % (w.category.__name__, w.message)
                if not any(line.endswith(text) for line in notes):
                    notes.append("%s: %s" % (name, text))
        except Exception as exc:  # noqa: BLE001
            outcome = "%s: %s" % (type(exc).__name__, exc)
            if os.environ.get("INTEROP_DEBUG"):
                traceback.print_exc()
        ok = outcome is None or outcome is True
        result(name, ok, "" if ok else str(outcome))
        return fn

    return run


def expect(cond, why):
    if not cond:
        raise AssertionError(why)


def finish(note_prefix=None):
    """The NOTE lines (after PREFIX, or NOTE_PREFIX), then exit: status 1 if any check failed."""
    for line in notes:
        print("NOTE " + ("".join(PREFIX) if note_prefix is None else note_prefix) + line)
    sys.exit(1 if failures else 0)
PYEOF
cat >"$WORK/a/check_a.py" <<'PYEOF'
"""Part A: pop3lite (and poplib, as a reference) against a real Dovecot.

usage: check_a.py REPO HOST PLAIN_PORT TLS_PORT CAFILE USER PASSWORD MANIFEST WORKDIR
Prints one "PASS name" / "FAIL name: why" line per check; exit status 1 if any failed.
"""
import io
import json
import os
import poplib
import ssl
import subprocess
import sys
import warnings

repo, host, plain_port, tls_port, cafile, user, password, manifest_path, work = sys.argv[1:10]
plain_port, tls_port = int(plain_port), int(tls_port)
sys.path.insert(0, repo)
import pop3lite  # noqa: E402
from interop_check import PREFIX, check, expect, finish, notes  # noqa: E402

with open(manifest_path) as f:
    manifest = json.load(f)
expected = [bytes.fromhex(m["expected"]) for m in manifest]
names = [m["name"] for m in manifest]
listed = [m["listed"] for m in manifest]
PREFIX.append("A:")


def ctx():
    return ssl.create_default_context(cafile=cafile)


def connect(tls="starttls", **kw):
    port = tls_port if tls == "implicit" else plain_port
    return pop3lite.POP3(host, port, tls=tls, ssl_context=ctx(), timeout=60, **kw)


# -- connection, greeting, capabilities, TLS --------------------------------------------------


@check("greeting-plain")
def _():
    with connect(tls="none") as pop:
        expect(pop.greeting.startswith("Dovecot"), repr(pop.greeting))
        expect(pop.timestamp is not None and pop.timestamp.startswith("<"), repr(pop.timestamp))
        expect(pop.tls_version is None, pop.tls_version)


@check("capa-plain")
def _():
    with connect(tls="none") as pop:
        caps = pop.capa()
        for name in ("TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "STLS", "USER", "SASL"):
            expect(name in caps, "%s missing from %r" % (name, dict(caps)))
        expect(caps.stls and caps.pipelining, "typed accessors")
        sasl = set(caps.sasl)
        expect({"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"} <= sasl, sasl)


@check("stls-verified")
def _():
    with connect(tls="starttls") as pop:
        expect(pop.tls_version in ("TLSv1.2", "TLSv1.3"), pop.tls_version)
        expect(pop.peer_certificate and pop.peer_certificate.get("subject"), "no certificate")
        expect("STLS" not in pop.capa(), "STLS still offered after STLS: %r" % dict(pop.capa()))
        expect(pop.timestamp is None, "APOP timestamp kept after STLS")


@check("stls-auto-loopback")
def _():
    with pop3lite.POP3(host, plain_port, ssl_context=ctx(), timeout=30) as pop:
        expect(pop.tls_version is not None, "tls='auto' on loopback did not use the offered STLS")


@check("implicit-tls-verified")
def _():
    with connect(tls="implicit") as pop:
        expect(pop.tls_version in ("TLSv1.2", "TLSv1.3"), pop.tls_version)
        expect(pop.greeting.startswith("Dovecot"), pop.greeting)


@check("implicit-tls-localhost-name")
def _():
    with pop3lite.POP3("localhost", tls_port, tls="implicit", ssl_context=ctx(), timeout=30) as pop:
        expect(pop.tls_version, "no TLS")


@check("untrusted-cert-rejected")
def _():
    try:
        pop3lite.POP3(host, tls_port, tls="implicit", timeout=30)  # system CAs only
    except pop3lite.TLSError:
        return
    raise AssertionError("connected although the certificate is not trusted")


@check("stls-untrusted-cert-rejected")
def _():
    try:
        pop3lite.POP3(host, plain_port, tls="starttls", timeout=30)
    except pop3lite.TLSError:
        return
    raise AssertionError("connected although the certificate is not trusted")


# -- authentication ----------------------------------------------------------------------------


@check("login-user-pass")
def _():
    with connect() as pop:
        pop.login(user, password)
        expect(pop.stat().count == len(expected), pop.stat())


@check("login-wrong-password")
def _():
    with connect() as pop:
        try:
            pop.login(user, password + "x")
        except pop3lite.AuthenticationError as exc:
            expect(exc.code == "AUTH", "code %r (text %r)" % (exc.code, exc.text))
            expect(password not in str(exc), "password in the exception")
            return
    raise AssertionError("no AuthenticationError")


chosen = []


@check("login-best")
def _():
    with connect() as pop:
        chosen.append(pop.login_best(user, password))
        expect(chosen[0] == "SCRAM-SHA-256", "picked %r" % chosen[0])
        pop.stat()


for mech in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"):

    @check("auth-" + mech)
    def _():
        with connect() as pop:
            pop.auth(mech, user, password)
            expect(pop.stat().count == len(expected), "stat")

    @check("auth-" + mech + "-wrong-password")
    def _():
        with connect() as pop:
            try:
                pop.auth(mech, user, "wrong-" + password)
            except pop3lite.AuthenticationError as exc:
                expect(password not in str(exc), "password in the exception")
                return
        raise AssertionError("no AuthenticationError")


@check("auth-PLAIN-implicit-tls")
def _():
    with connect(tls="implicit") as pop:
        pop.auth("PLAIN", user, password)
        pop.noop()


@check("apop-plain-loopback")
def _():
    with connect(tls="none") as pop:
        pop.apop(user, password)
        expect(pop.stat().count == len(expected), "stat")


@check("apop-wrong-password")
def _():
    with connect(tls="none") as pop:
        try:
            pop.apop(user, password + "x")
        except pop3lite.AuthenticationError:
            return
    raise AssertionError("no AuthenticationError")


@check("apop-refused-after-stls")
def _():
    with connect() as pop:
        try:
            pop.apop(user, password)
        except (ValueError, pop3lite.Error):
            return
    raise AssertionError("APOP after STLS was attempted with the plaintext timestamp")


@check("capa-after-login")
def _():
    with connect() as pop:
        pop.login(user, password)
        caps = pop.capa()
        expect("TOP" in caps and "UIDL" in caps, dict(caps))
        expect("USER" not in caps and "SASL" not in caps and "STLS" not in caps,
               "after login: %r" % dict(caps))


# -- transaction --------------------------------------------------------------------------------


@check("stat-list-uidl")
def _():
    with connect() as pop:
        pop.login(user, password)
        st = pop.stat()
        sizes = pop.list()
        expect(st.count == len(expected), st)
        expect(sorted(sizes) == list(range(1, len(expected) + 1)), sizes)
        expect(st.size == sum(sizes.values()), (st, sizes))
        expect(pop.list(2) == sizes[2], "list(2)")
        uids = pop.uidl()
        expect(len(set(uids.values())) == len(expected) and not uids.duplicates, uids)
        expect(pop.uidl(3) == uids[3], "uidl(3)")


@check("list-size-equals-len-retr-each")
def _():
    bad = []
    with connect() as pop:
        pop.login(user, password)
        sizes = pop.list()
        for n, size in sizes.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = len(pop.retr(n))
            if got != size and not (size == listed[n - 1] and got == size + 2):
                bad.append("%d(%s): LIST %d, retr %d" % (n, names[n - 1], size, got))
            elif got != size:
                notes.append("message %d (%s, no final newline in the file): LIST and RETR's "
                             "'+OK %d octets' say %d, Dovecot sends %d (it adds the CRLF before "
                             "the '.'); pop3lite warned: %s"
                             % (n, names[n - 1], size, size, got,
                                [str(w.message) for w in caught] or "no"))
                expect(any(issubclass(w.category, pop3lite.SizeMismatchWarning) for w in caught),
                       "no SizeMismatchWarning for message %d" % n)
    expect(not bad, "; ".join(bad))


@check("retr-bytes")
def _():
    bad = []
    with connect() as pop:
        pop.login(user, password)
        for n, want in enumerate(expected, 1):
            got = pop.retr(n)
            if got != want:
                bad.append("%d(%s): got %r... want %r..." % (n, names[n - 1], got[-40:], want[-40:]))
    expect(not bad, "; ".join(bad))


@check("retr-dot-lines")
def _():
    with connect() as pop:
        pop.login(user, password)
        data = pop.retr(names.index("dots") + 1)
        expect(b"\r\n.\r\n..\r\n.hidden\r\n...three\r\n. space\r\nend.\r\n.\r\n" in data, data)


@check("retr_to-large")
def _():
    n = names.index("large") + 1
    buf = io.BytesIO()
    with connect() as pop:
        pop.login(user, password)
        size = pop.list(n)
        written = pop.retr_to(n, buf)
    expect(written == len(buf.getvalue()), "returned %d, wrote %d" % (written, len(buf.getvalue())))
    expect(buf.getvalue() == expected[n - 1], "bytes differ")
    expect(written == size, "LIST %d vs %d" % (size, written))


@check("retr_to-file-all")
def _():
    with connect() as pop:
        pop.login(user, password)
        for n, want in enumerate(expected, 1):
            path = os.path.join(work, "retr_to_%d.eml" % n)
            with open(path, "wb") as f:
                pop.retr_to(n, f)
            with open(path, "rb") as f:
                expect(f.read() == want, "message %d differs" % n)


@check("max-message-size-then-in-step")
def _():
    n = names.index("large") + 1
    with connect(max_message_size=2**20) as pop:
        pop.login(user, password)
        try:
            pop.retr(n)
        except pop3lite.LimitExceeded:
            pass
        else:
            raise AssertionError("no LimitExceeded")
        try:
            pop.noop()
        except pop3lite.NetworkError:
            notes.append("after LimitExceeded the connection was closed")
            return
        expect(pop.retr(1) == expected[0], "out of step after LimitExceeded")


@check("top")
def _():
    with connect() as pop:
        pop.login(user, password)
        n = names.index("dots") + 1
        full = expected[n - 1]
        head, body = full.split(b"\r\n\r\n", 1)
        got = pop.top(n, 2)
        want = head + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in body.split(b"\r\n")[:2])
        expect(got == want, "top 2: %r vs %r" % (got[-60:], want[-60:]))
        got0 = pop.top(n, 0)
        expect(got0 == head + b"\r\n\r\n", "top 0: %r" % got0[-30:])


@check("message-utf8-header")
def _():
    with connect() as pop:
        pop.login(user, password)
        msg = pop.message(names.index("utf8") + 1)
        want = "\u65e5\u672c\u8a9e\u306e\u4ef6\u540d caf\u00e9"
        expect(str(msg["Subject"]) == want, repr(msg["Subject"]))
        expect("Jos\u00e9" in str(msg["From"]), repr(msg["From"]))
        expect("\u3053\u3093\u306b\u3061\u306f" in msg.get_content(), msg.get_content())


@check("retr_many-pipelined")
def _():
    with connect() as pop:
        pop.login(user, password)
        expect(pop.capa().pipelining, "PIPELINING not offered after login")
        numbers = list(range(1, len(expected) + 1)) * 2
        got = list(pop.retr_many(numbers))
        expect([f.number for f in got] == numbers, [f.number for f in got])
        for f in got:
            expect(f.error is None, f.error)
            expect(f.data == expected[f.number - 1], "message %d differs" % f.number)
        pop.noop()


@check("retr_many-with-error")
def _():
    with connect() as pop:
        pop.login(user, password)
        got = list(pop.retr_many([1, 99, 2]))
        expect(got[0].data == expected[0] and got[2].data == expected[1], "data")
        expect(isinstance(got[1].error, pop3lite.ServerError), got[1])
        pop.noop()


@check("top_many")
def _():
    with connect() as pop:
        pop.login(user, password)
        got = list(pop.top_many(range(1, len(expected) + 1), 0))
        for f in got:
            expect(f.error is None, f.error)
            head = expected[f.number - 1].split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            expect(f.data == head, "header of %d: %r vs %r" % (f.number, f.data[-40:], head[-40:]))


@check("errors-no-such-message")
def _():
    with connect() as pop:
        pop.login(user, password)
        for call in (lambda: pop.retr(99), lambda: pop.list(99), lambda: pop.uidl(99),
                     lambda: pop.top(99, 1), lambda: pop.dele(99)):
            try:
                call()
            except pop3lite.ServerError:
                continue
            raise AssertionError("no ServerError")
        pop.noop()  # still in step


@check("dele-many-rset-quit-keeps-all")
def _():
    with connect() as pop:
        pop.login(user, password)
        got = list(pop.dele_many(range(1, len(expected) + 1)))
        expect(all(f.error is None for f in got), got)
        expect(pop.stat().count == 0, "stat after DELE all: %r" % (pop.stat(),))
        try:
            pop.retr(1)
        except pop3lite.ServerError:
            pass
        else:
            raise AssertionError("RETR of a deleted message succeeded")
        pop.rset()
        expect(pop.stat().count == len(expected), "RSET")
        pop.quit()
    with connect() as pop:
        pop.login(user, password)
        expect(pop.stat().count == len(expected), "lost messages")


@check("context-manager-exception-deletes-nothing")
def _():
    class Boom(Exception):
        pass

    try:
        with connect() as pop:
            pop.login(user, password)
            list(pop.dele_many([1, 2]))
            raise Boom()
    except Boom:
        pass
    with connect() as pop:
        pop.login(user, password)
        expect(pop.stat().count == len(expected), "messages deleted by a failed block: %r" % (pop.stat(),))


@check("concurrent-session-allowed-by-dovecot")
def _():
    # RFC 1939 section 8 lets a server lock the maildrop; Dovecot does not by default.
    with connect() as a, connect() as b:
        a.login(user, password)
        try:
            b.login(user, password)
        except pop3lite.InUseError:
            notes.append("dovecot: second session got [IN-USE]")
            return
        notes.append("dovecot: a second concurrent session was allowed (no maildrop lock)")


@check("logging-redacts-password")
def _():
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("pop3lite")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        for how in ("login", "PLAIN", "LOGIN"):
            with connect() as pop:
                if how == "login":
                    pop.login(user, password)
                else:
                    pop.auth(how, user, password)
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    text = stream.getvalue()
    import base64

    expect(password not in text, "password logged")
    expect(base64.b64encode(password.encode()).decode() not in text, "base64 password logged")
    expect(base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode() not in text,
           "PLAIN response logged")
    expect("C: STAT" in text or "C: CAPA" in text, "no protocol lines logged")


# -- poplib, the reference ---------------------------------------------------------------------


@check("poplib-stls-session")
def _():
    p = poplib.POP3(host, plain_port, timeout=60)
    p.stls(ctx())
    p.user(user)
    p.pass_(password)
    count, size = p.stat()
    expect(count == len(expected), count)
    for n, want in enumerate(expected, 1):
        resp, lines, octets = p.retr(n)
        got = b"".join(line + b"\r\n" for line in lines)
        expect(got == want, "poplib message %d differs" % n)
    resp, uids, _ = p.uidl()
    with connect() as pop:
        pop.login(user, password)
        ours = pop.uidl()
    theirs = dict((int(x.split()[0]), x.split()[1].decode()) for x in uids)
    expect(theirs == dict(ours), "UIDL differs between poplib and pop3lite")
    p.quit()


@check("poplib-implicit-tls-apop")
def _():
    p = poplib.POP3_SSL(host, tls_port, timeout=60, context=ctx())
    p.apop(user, password)
    expect(p.stat()[0] == len(expected), "stat")
    p.quit()


# -- the command line ------------------------------------------------------------------------


def cli(*args, expect_status=0):
    env = dict(os.environ, POP3_PASSWORD=password, HOME=work)
    cmd = [sys.executable, os.path.join(repo, "pop3lite.py"), "%s:%d" % (host, plain_port), user,
           *args, "--tls", "starttls", "--cafile", cafile, "--timeout", "60"]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != expect_status:
        raise AssertionError("exit %d: %s %s" % (proc.returncode, out[-300:], err[-300:]))
    if password in out or password in err:
        raise AssertionError("password printed")
    return out, err


@check("cli-check")
def _():
    out, err = cli("check")
    expect("%d messages" % len(expected) in out, out)


@check("cli-check-json")
def _():
    out, _ = cli("check", "--json")
    data = json.loads(out)
    expect(data["count"] == len(expected), data["count"])
    expect(data["tls"] and data["tls"]["verified"], data["tls"])
    expect(data["auth"] == "SCRAM-SHA-256", data["auth"])
    with connect() as pop:
        pop.login(user, password)
        sizes, uids = pop.list(), pop.uidl()
    for m in data["messages"]:
        expect(m["size"] == sizes[m["number"]] and m["uid"] == uids[m["number"]], m)
    subj = [m["subject"] for m in data["messages"]]
    expect("\u65e5\u672c\u8a9e\u306e\u4ef6\u540d caf\u00e9" in subj, subj)


@check("cli-capa")
def _():
    out, _ = cli("capa")
    expect("PIPELINING" in out and "SCRAM-SHA-256" in out, out)


@check("cli-uidl")
def _():
    out, _ = cli("uidl", "--json")
    with connect() as pop:
        pop.login(user, password)
        uids = pop.uidl()
    got = {d["number"]: d["uid"] for d in json.loads(out)}
    expect(got == dict(uids), got)


@check("cli-top")
def _():
    out, _ = cli("top", "2", "3")
    expect("dot lines" in out and ".hidden" in out, out)


@check("cli-retr-output-file")
def _():
    path = os.path.join(work, "cli-retr-2.eml")
    cli("retr", "2", "-o", path)
    with open(path, "rb") as f:
        expect(f.read() == expected[1], "retr -o bytes differ")


@check("cli-save-new-twice")
def _():
    target = os.path.join(work, "saved-maildir")
    out1, _ = cli("save", target, "--new")
    files = []
    for sub in ("new", "cur"):
        d = os.path.join(target, sub)
        if os.path.isdir(d):
            files += [os.path.join(d, x) for x in os.listdir(d)]
    expect(len(files) == len(expected), "saved %d files: %s" % (len(files), out1))
    saved = set()
    for path in files:
        with open(path, "rb") as f:
            saved.add(f.read())
    # A Maildir holds LF or CRLF files; accept either, but the content must be the message.
    want_crlf = set(expected)
    want_lf = {m.replace(b"\r\n", b"\n") for m in expected}
    expect(saved == want_crlf or saved == want_lf,
           "saved bytes differ from the messages: %r" % sorted(
               (m[-30:] for m in saved.symmetric_difference(want_lf if b"\r\n" not in b"".join(saved) else want_crlf))))
    out2, _ = cli("save", target, "--new")
    files2 = sum(len(os.listdir(os.path.join(target, s))) for s in ("new", "cur") if os.path.isdir(os.path.join(target, s)))
    expect(files2 == len(expected), "second --new saved again: %d files; %s" % (files2, out2))


@check("cli-wrong-password-exit-3")
def _():
    env = dict(os.environ, POP3_PASSWORD="nope", HOME=work)
    cmd = [sys.executable, os.path.join(repo, "pop3lite.py"), "%s:%d" % (host, plain_port), user,
           "check", "--tls", "starttls", "--cafile", cafile, "--timeout", "60"]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    expect(proc.returncode == 3, "exit %d: %r" % (proc.returncode, proc.stderr[-300:]))


@check("cli-implicit-tls")
def _():
    env = dict(os.environ, POP3_PASSWORD=password, HOME=work)
    cmd = [sys.executable, os.path.join(repo, "pop3lite.py"), "%s:%d" % (host, tls_port), user,
           "check", "--tls", "implicit", "--cafile", cafile, "--timeout", "60"]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    expect(proc.returncode == 0, "exit %d: %r" % (proc.returncode, proc.stderr[-300:]))


# -- last: deletions committed by QUIT ----------------------------------------------------------


@check("dele-quit-commits")
def _():
    with connect() as pop:
        pop.login(user, password)
        before = pop.uidl()
        pop.dele(1)
        pop.quit()
    with connect() as pop:
        pop.login(user, password)
        after = pop.uidl()
        expect(pop.stat().count == len(expected) - 1, "not deleted")
        expect(sorted(after.values()) == sorted(v for k, v in before.items() if k != 1), "UIDs changed")
        expect(pop.retr(1) == expected[1], "renumbered message 1 is not the old message 2")


finish()
PYEOF
PYTHONPATH=$WORK "$PY" "$WORK/a/check_a.py" "$REPO" 127.0.0.1 "$DV_PLAIN" "$DV_TLS" "$CA" "$DV_USER" \
    "$DV_PASSWORD" "$WORK/a/manifest.json" "$WORK/a" >"$WORK/a/results.txt" 2>"$WORK/a/stderr.txt"
count_results A:check_a.py $? "$WORK/a/results.txt" "$WORK/a/stderr.txt"
# Dovecot's side of the story: nothing it logged as an error or a protocol violation.
check "A:dovecot-log-clean" bash -c "! grep -E 'Error:|Panic:|Fatal:|unexpected|BUG' '$DV/dovecot.log'"

# ---------------------------------------------------------------------------------------------
# Part B: real POP3 clients against fakeserver.py
# ---------------------------------------------------------------------------------------------
echo "== B: curl, openssl s_client, fetchmail, mpop, getmail6 against fakeserver.py"
B=$WORK/b
mkdir -p "$B"
FAKECA=$B/fakeca.pem
cat >"$B/b_util.py" <<'PYEOF'
"""Part B helpers: expected messages, comparisons, server state through poplib (stdlib)."""
import os
import poplib
import re
import ssl
import sys

repo = os.environ["REPO"]
sys.path.insert(0, repo)
import fakeserver  # noqa: E402

PRESETS = {"operamail": fakeserver.OPERAMAIL_MESSAGES, "rfc": fakeserver.RFC_MESSAGES}


def files_in(path):
    out = []
    for sub in ("new", "cur"):
        if os.path.isdir(os.path.join(path, sub)):
            out += [os.path.join(path, sub, f) for f in sorted(os.listdir(os.path.join(path, sub)))]
    if not out and os.path.isdir(path):
        out = [os.path.join(path, f) for f in sorted(os.listdir(path), key=lambda s: (len(s), s))
               if os.path.isfile(os.path.join(path, f))]
    return out


def normalize(data, skip):
    """Header fields unfolded with white space collapsed, leading fields the client added
    dropped; the body exactly (LF line ends)."""
    data = data.replace(b"\r\n", b"\n")
    head, _, body = data.partition(b"\n\n")
    fields = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line
        else:
            fields.append(line)
    fields = [b" ".join(f.split()) for f in fields]
    while fields and fields[0].split(b":", 1)[0].lower() in skip:
        fields.pop(0)
    return fields, body


def compare(path, preset, mode, numbers, skip):
    """mode: crlf (exact bytes), lf (exact after CRLF->LF), fields (normalize())."""
    want = [PRESETS[preset][n - 1] for n in numbers]
    got = [open(f, "rb").read() for f in files_in(path)]
    if len(got) != len(want):
        return "%d files, expected %d" % (len(got), len(want))
    if mode == "crlf":
        key = lambda d: d  # noqa: E731
    elif mode == "lf":
        key = lambda d: d.replace(b"\r\n", b"\n")  # noqa: E731
    else:
        key = lambda d: repr(normalize(d, skip))  # noqa: E731
    g = sorted(key(d) for d in got)
    w = sorted(key(d) for d in want)
    if g != w:
        for a, b in zip(g, w):
            if a != b:
                return "differs: got %r... want %r..." % (a[:300], b[:300])
    return None


def stat(port, tls, ca):
    if tls == "implicit":
        p = poplib.POP3_SSL("127.0.0.1", port, timeout=20,
                            context=ssl.create_default_context(cafile=ca))
    else:
        p = poplib.POP3("127.0.0.1", port, timeout=20)
        if tls == "stls":
            p.stls(ssl.create_default_context(cafile=ca))
    p.user("hogehoge")
    p.pass_("fugafuga")
    count = p.stat()[0]
    p.quit()
    return count


def main(argv):
    cmd = argv[0]
    if cmd == "compare":  # compare DIR PRESET MODE NUMBERS(1,2,3) [SKIP-FIELD...]
        numbers = [int(x) for x in argv[4].split(",") if x]
        why = compare(argv[1], argv[2], argv[3], numbers, {s.encode().lower() for s in argv[5:]})
        if why:
            print(why)
            return 1
        return 0
    if cmd == "stat":  # stat PORT TLS CA
        print(stat(int(argv[1]), argv[2], argv[3]))
        return 0
    if cmd == "count":  # count PRESET
        print(len(PRESETS[argv[1]]))
        return 0
    if cmd == "write":  # write PRESET N FILE
        with open(argv[3], "wb") as f:
            f.write(PRESETS[argv[1]][int(argv[2]) - 1])
        return 0
    if cmd == "dele-before-quit":  # TRANSCRIPT: every session with DELE sent QUIT after it
        text = open(argv[1], encoding="utf-8", errors="replace").read()
        sessions = {}
        for m in re.finditer(r"^\[(\d+)\] C: (\S+)", text, re.M):
            sessions.setdefault(m.group(1), []).append(m.group(2).upper())
        with_dele = [s for s, verbs in sessions.items() if "DELE" in verbs]
        if not with_dele:
            print("no session sent DELE")
            return 1
        for s in with_dele:
            verbs = sessions[s]
            if "QUIT" not in verbs[verbs.index("DELE"):]:
                print("session %s sent DELE without a later QUIT" % s)
                return 1
        return 0
    if cmd == "verbs":  # TRANSCRIPT: the set of command verbs clients used
        text = open(argv[1], encoding="utf-8", errors="replace").read()
        print(" ".join(sorted(set(m.group(1).upper() for m in
                                  re.finditer(r"^\[\d+\] C: ([A-Za-z]+)\b", text, re.M)))))
        return 0
    raise SystemExit("unknown command " + cmd)


sys.exit(main(sys.argv[1:]))
PYEOF
bu() { "$PY" "$B/b_util.py" "$@"; }
N_OM=$(bu count operamail)
N_RFC=$(bu count rfc)
ALL_OM=$(seq -s, 1 "$N_OM")
ALL_RFC=$(seq -s, 1 "$N_RFC")
for i in $(seq 1 "$N_OM"); do bu write operamail "$i" "$B/exp-om-$i.eml"; done
for i in $(seq 1 "$N_RFC"); do bu write rfc "$i" "$B/exp-rfc-$i.eml"; done

# start_fake NAME ARGS...: a fakeserver.py on a free port; sets FPORT and FPID; its C:/S:
# transcript goes to $B/NAME.err
start_fake() {
    local name=$1
    shift
    "$PY" "$REPO/fakeserver.py" --port 0 "$@" >"$B/$name.out" 2>"$B/$name.err" &
    FPID=$!
    PIDS+=($FPID)
    FPORT=
    if wait_for test -s "$B/$name.out"; then
        FPORT=$(head -n1 "$B/$name.out" | sed -n 's/^127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p')
    fi
    if [ -z "$FPORT" ] || ! wait_for port_open "$FPORT"; then
        fail "B:$name-start" "fakeserver.py did not print HOST:PORT or is not listening"
        return 1
    fi
}
# stat_is PORT TLS EXPECTED: the maildrop as another client (poplib) sees it now
stat_is() {
    local got
    got=$(bu stat "$1" "$2" "$FAKECA") || { echo "poplib STAT failed: $got"; return 1; }
    [ "$got" = "$3" ] || { echo "STAT says $got messages, expected $3"; return 1; }
}
in_transcript() { grep -qE "$2" "$B/$1.err" || { echo "not in the $1 transcript: $2"; return 1; }; }
not_in_transcript() { ! grep -qE "$2" "$B/$1.err" || { echo "in the $1 transcript: $2"; return 1; }; }

start_fake om || true; OM=$FPORT; OM_PID=$FPID
start_fake rfc --preset rfc || true; RFC=$FPORT
start_fake stls --preset rfc --tls stls --write-ca "$FAKECA" || true; STLS=$FPORT
start_fake ssl --preset rfc --tls implicit || true; SSLP=$FPORT
start_fake omstls --tls stls || true; OMSTLS=$FPORT
check "B:fakeserver-write-ca" openssl x509 -in "$FAKECA" -noout

# -- curl ---------------------------------------------------------------------------------------
C=(curl -sS --max-time 30 -u hogehoge:fugafuga)
curl_retr_all() { # DIR URL-PREFIX N CURL-OPTIONS...
    local dir=$1 url=$2 n=$3 i
    shift 3
    rm -rf "$dir"
    mkdir -p "$dir"
    for i in $(seq 1 "$n"); do "${C[@]}" "$@" "$url/$i" -o "$dir/$i.eml" || return 1; done
}
check "B:curl-operamail-list" bash -c "[ \"\$(${C[*]} pop3://127.0.0.1:$OM/ | tr -d '\r')\" = \"\$(printf '1 5954\n2 4226')\" ]"
curl_retr_all "$B/curl-om" "pop3://127.0.0.1:$OM" "$N_OM"
check "B:curl-operamail-retr-bytes" bu compare "$B/curl-om" operamail crlf "$ALL_OM"
check "B:curl-operamail-chose-apop" in_transcript om '\] C: APOP hogehoge \*\*\*\*$'  # the digest is hidden: it can be cracked offline
curl_retr_all "$B/curl-rfc" "pop3://127.0.0.1:$RFC" "$N_RFC"
check "B:curl-rfc-retr-bytes" bu compare "$B/curl-rfc" rfc crlf "$ALL_RFC"
check "B:curl-rfc-uidl" bash -c "${C[*]} -X UIDL pop3://127.0.0.1:$RFC/ | tr -d '\r' | grep -cE '^[0-9]+ [!-~]{1,70}$' | grep -qx $N_RFC"
check "B:curl-rfc-top-2-0" bash -c "${C[*]} -X 'TOP 2 0' pop3://127.0.0.1:$RFC/ >$B/curl-top.eml && \"$PY\" -c 'import sys; a=open(sys.argv[1],\"rb\").read(); b=open(sys.argv[2],\"rb\").read(); sys.exit(a != b.split(b\"\r\n\r\n\")[0] + b\"\r\n\r\n\")' $B/curl-top.eml $B/exp-rfc-2.eml"
for mech in PLAIN LOGIN CRAM-MD5 +APOP; do
    check "B:curl-rfc-auth-$mech" bash -c "${C[*]} --login-options 'AUTH=$mech' pop3://127.0.0.1:$RFC/1 | cmp -s - $B/exp-rfc-1.eml"
done
check "B:curl-rfc-auth-PLAIN-sasl-ir" "${C[@]}" --sasl-ir --login-options AUTH=PLAIN -o /dev/null "pop3://127.0.0.1:$RFC/"
check "B:curl-rfc-auth-sasl-ir-on-the-wire" in_transcript rfc '\] C: AUTH PLAIN \*\*\*\*'
check "B:curl-rfc-oauthbearer" curl -sS --max-time 30 -u hogehoge: --oauth2-bearer fake-oauth-token -o /dev/null "pop3://127.0.0.1:$RFC/"
# (curl 7.88 picks OAUTHBEARER even with AUTH=XOAUTH2; mpop below tries XOAUTH2)
check "B:curl-rfc-oauthbearer-on-wire" in_transcript rfc '\] C: AUTH OAUTHBEARER$'

check "B:curl-rfc-wrong-password-exit-67" bash -c "curl -sS --max-time 30 -u hogehoge:wrong pop3://127.0.0.1:$RFC/ >/dev/null 2>&1; [ \$? = 67 ]"
check "B:curl-stls-verified-retr" bash -c "${C[*]} --ssl-reqd --cacert $FAKECA pop3://127.0.0.1:$STLS/1 | cmp -s - $B/exp-rfc-1.eml"
check "B:curl-stls-in-transcript" in_transcript stls '\] C: STLS$'
check "B:curl-stls-untrusted-refused" bash -c "${C[*]} --ssl-reqd pop3://127.0.0.1:$STLS/1 >/dev/null 2>&1; [ \$? = 60 ]"
check "B:curl-implicit-verified-retr" bash -c "${C[*]} --cacert $FAKECA pop3s://127.0.0.1:$SSLP/2 | cmp -s - $B/exp-rfc-2.eml"
check "B:curl-implicit-localhost-name" bash -c "${C[*]} --cacert $FAKECA pop3s://localhost:$SSLP/2 | cmp -s - $B/exp-rfc-2.eml"
# RFC 2595 section 4: STLS is found through CAPA. The OperaMail preset has no CAPA, so with
# --tls stls no client that follows the RFCs can find STLS (curl: "STLS not supported").
check "B:curl-operamail-stls-discoverable" bash -c "${C[*]} --ssl-reqd --cacert $FAKECA pop3://127.0.0.1:$OMSTLS/1 | cmp -s - $B/exp-om-1.eml"
if start_fake curldel --preset rfc; then
    check "B:curl-dele" "${C[@]}" -I -X 'DELE 1' "pop3://127.0.0.1:$FPORT/"
    check "B:curl-dele-applied-after-quit" stat_is "$FPORT" none $((N_RFC - 1))
    check "B:curl-dele-then-quit" bu dele-before-quit "$B/curldel.err"
fi

# -- openssl s_client -starttls pop3 ------------------------------------------------------------
S_CLIENT=(openssl s_client -CAfile "$FAKECA" -verify_return_error -verify_hostname localhost -quiet -crlf)
# Commands end in LF: -crlf turns them into CRLF.
printf 'CAPA\nUSER hogehoge\nPASS fugafuga\nSTAT\nLIST\nUIDL\nTOP 1 0\nRETR 2\nQUIT\n' |
    timeout 30 "${S_CLIENT[@]}" -connect "127.0.0.1:$STLS" -starttls pop3 >"$B/s_client-stls.out" 2>"$B/s_client-stls.err"
echo $? >"$B/s_client-stls.rc"
s_client_retr2() { # OUTPUT: the RETR 2 body, unstuffed, equals the message
    "$PY" - "$1" "$B/exp-rfc-2.eml" <<'PYEOF'
import sys
d = open(sys.argv[1], "rb").read()
want = open(sys.argv[2], "rb").read()
i = d.index(b"+OK %d octets\r\n" % len(want)) + len(b"+OK %d octets\r\n" % len(want))
j = d.index(b"\r\n.\r\n", i) + 2
body = d[i:j].replace(b"\r\n..", b"\r\n.")
sys.exit(0 if body == want and d.rstrip().endswith(b"signing off") else 1)
PYEOF
}
check "B:openssl-stls-verified-session" bash -c "$(declare -f s_client_retr2); PY=$PY; B=$B; s_client_retr2 $B/s_client-stls.out"
check "B:openssl-stls-capa-hides-stls-and-user-after-tls" bash -c "grep -q '^STLS' $B/s_client-stls.out && exit 1; grep -q '^USER' $B/s_client-stls.out"
printf 'USER hogehoge\nPASS fugafuga\nRETR 2\nQUIT\n' |
    timeout 30 "${S_CLIENT[@]}" -connect "127.0.0.1:$SSLP" >"$B/s_client-ssl.out" 2>"$B/s_client-ssl.err"
echo $? >"$B/s_client-ssl.rc"
check "B:openssl-implicit-verified-session" bash -c "$(declare -f s_client_retr2); PY=$PY; B=$B; s_client_retr2 $B/s_client-ssl.out"
# RFC 8446 section 6.1: close_notify before closing. OpenSSL 3 reports a bare TCP EOF.
check "B:openssl-tls-closed-with-close_notify" bash -c "[ \$(cat $B/s_client-ssl.rc) = 0 ] || { grep -o 'unexpected eof[^:]*' $B/s_client-ssl.err | head -n1; exit 1; }"
# DELE, then the connection ends without QUIT: RFC 1939 section 6, no UPDATE state, nothing deleted.
if start_fake nodel --preset rfc --tls stls; then
    {
        printf 'USER hogehoge\nPASS fugafuga\nDELE 1\nDELE 2\n'
        wait_for bash -c "grep -A1 '\] C: DELE 2' '$B/nodel.err' | grep -q '\] S: +OK'"
    } | timeout 30 openssl s_client -CAfile "$FAKECA" -verify_return_error -quiet -no_ign_eof -crlf \
        -connect "127.0.0.1:$FPORT" -starttls pop3 >"$B/s_client-nodel.out" 2>&1
    check "B:openssl-dele-acknowledged" in_transcript nodel '\] C: DELE 2$'
    check "B:openssl-no-quit-in-session" not_in_transcript nodel '\] C: QUIT'
    check "B:dele-without-quit-deletes-nothing" stat_is "$FPORT" stls "$N_RFC"
fi

# -- fetchmail ------------------------------------------------------------------------------------
FM=$B/fetchmail
mkdir -p "$FM"
cat >"$FM/mda.sh" <<'SH'
#!/bin/sh
# fetchmail's MDA here: one file per message, numbered in order of delivery
n=$(ls "$1" | wc -l)
cat >"$1/$((n + 1)).eml"
SH
chmod 755 "$FM/mda.sh"
# fetchmail_run NAME PORT SERVER-OPTIONS USER-OPTIONS [FLAGS...]: poll localhost (fetchmail checks
# DNS names only, not IP addresses, against the certificate); messages into $FM/NAME/
fetchmail_run() {
    local name=$1 port=$2 sopts=$3 uopts=$4
    shift 4
    mkdir -p "$FM/$name"
    printf 'set no syslog\npoll localhost port %s timeout 30 %s\n  user "hogehoge" password "fugafuga" is root here no rewrite mda "%s %s" %s\n' \
        "$port" "$sopts" "$FM/mda.sh" "$FM/$name" "$uopts" >"$FM/$name.rc"
    chmod 600 "$FM/$name.rc"
    FETCHMAILHOME=$FM timeout 120 fetchmail -f "$FM/$name.rc" --pidfile "$FM/pid" --nosyslog -v \
        -i "$FM/$name.ids" "$@" >>"$FM/$name.log" 2>&1
}
NOTLS="sslproto '' no sslcertck"
STLS_REQ="sslproto tls1.2+ sslcertck sslcertfile $FAKECA"
fetchmail_run om-apop "$OM" "protocol apop" "$NOTLS keep"
check "B:fetchmail-operamail-apop-exit-0" test $? = 0
check "B:fetchmail-operamail-apop-bytes" bu compare "$FM/om-apop" operamail fields "$ALL_OM" received
check "B:fetchmail-operamail-apop-on-wire" bash -c "grep -q 'POP3> APOP hogehoge [0-9a-f]\{32\}' $FM/om-apop.log"
check "B:fetchmail-operamail-keep" stat_is "$OM" none "$N_OM"
fetchmail_run om-user "$OM" "protocol pop3 auth password" "$NOTLS keep"
check "B:fetchmail-operamail-user-pass" bu compare "$FM/om-user" operamail fields "$ALL_OM" received
fetchmail_run stls-uidl "$STLS" "protocol pop3 uidl auth password" "$STLS_REQ keep"
check "B:fetchmail-stls-uidl-first-run" bu compare "$FM/stls-uidl" rfc fields "$ALL_RFC" received
check "B:fetchmail-stls-upgraded" bash -c "grep -q 'upgrade to TLS succeeded' $FM/stls-uidl.log"
fetchmail_run stls-uidl "$STLS" "protocol pop3 uidl auth password" "$STLS_REQ keep"
check "B:fetchmail-stls-uidl-second-run-exit-1-no-mail" test $? = 1
check "B:fetchmail-uidl-fetches-only-new" bu compare "$FM/stls-uidl" rfc fields "$ALL_RFC" received
fetchmail_run ssl-cram "$SSLP" "protocol pop3 auth cram-md5" "ssl sslcertck sslcertfile $FAKECA keep"
check "B:fetchmail-implicit-tls-cram-md5" bu compare "$FM/ssl-cram" rfc fields "$ALL_RFC" received
check "B:fetchmail-cram-md5-on-wire" in_transcript ssl '\] C: AUTH CRAM-MD5$'
fetchmail_run stls-untrusted "$STLS" "protocol pop3 auth password" "sslproto tls1.2+ sslcertck keep"
check "B:fetchmail-untrusted-cert-refused" bash -c "[ ! -e $FM/stls-untrusted/1.eml ]"
if start_fake fmdel --preset rfc --tls stls; then
    fetchmail_run nokeep "$FPORT" "protocol pop3 auth password" "$STLS_REQ nokeep"
    check "B:fetchmail-nokeep-bytes" bu compare "$FM/nokeep" rfc fields "$ALL_RFC" received
    check "B:fetchmail-nokeep-deleted" stat_is "$FPORT" stls 0
    check "B:fetchmail-nokeep-dele-then-quit" bu dele-before-quit "$B/fmdel.err"
fi

# -- mpop ---------------------------------------------------------------------------------------
MP=$B/mpop
mkdir -p "$MP"
# mpop_run NAME PORT TLS(none|stls|implicit) AUTH KEEP [UIDLS-FILE] [PASSWORD]: into Maildir $MP/NAME
mpop_run() {
    local name=$1 port=$2 tls=$3 auth=$4 keep=$5 uidls=${6:-$MP/$1.uidls} password=${7:-fugafuga}
    mkdir -p "$MP/$name/new" "$MP/$name/cur" "$MP/$name/tmp"
    {
        printf 'defaults\ntimeout 30\nreceived_header off\n'
        printf 'account test\nhost 127.0.0.1\nport %s\nuser hogehoge\npassword %s\nauth %s\n' "$port" "$password" "$auth"
        printf 'keep %s\nuidls_file %s\ndelivery maildir %s\n' "$keep" "$uidls" "$MP/$name"
        case $tls in
        none) printf 'tls off\n' ;;
        stls) printf 'tls on\ntls_starttls on\ntls_trust_file %s\n' "$FAKECA" ;;
        stls-system-ca) printf 'tls on\ntls_starttls on\ntls_trust_file system\n' ;;
        implicit) printf 'tls on\ntls_starttls off\ntls_trust_file %s\n' "$FAKECA" ;;
        esac
    } >"$MP/$name.rc"
    chmod 600 "$MP/$name.rc"
    timeout 120 mpop -C "$MP/$name.rc" -d test >>"$MP/$name.log" 2>&1
}
mpop_run om-apop "$OM" none apop on
check "B:mpop-operamail-apop-exit-0" test $? = 0
check "B:mpop-operamail-apop-bytes" bu compare "$MP/om-apop" operamail lf "$ALL_OM"
check "B:mpop-operamail-keep" stat_is "$OM" none "$N_OM"
for mech in user plain login cram-md5 scram-sha-1 scram-sha-256; do
    mpop_run "stls-$mech" "$STLS" stls "$mech" on
    check "B:mpop-stls-auth-$mech" bu compare "$MP/stls-$mech" rfc lf "$ALL_RFC"
done
check "B:mpop-scram-on-wire" bash -c "grep -q '\] C: AUTH SCRAM-SHA-256' $B/stls.err && grep -q '\] C: AUTH SCRAM-SHA-1' $B/stls.err"
mpop_run stls-oauthbearer "$STLS" stls oauthbearer on "" fake-oauth-token
check "B:mpop-stls-auth-oauthbearer" bu compare "$MP/stls-oauthbearer" rfc lf "$ALL_RFC"
mpop_run stls-xoauth2 "$STLS" stls xoauth2 on "" fake-oauth-token
check "B:mpop-stls-auth-xoauth2" bu compare "$MP/stls-xoauth2" rfc lf "$ALL_RFC"
mpop_run stls-scram-sha-256 "$STLS" stls scram-sha-256 on
check "B:mpop-only-new-second-run" bu compare "$MP/stls-scram-sha-256" rfc lf "$ALL_RFC"
check "B:mpop-pipelined-retr" bash -c "grep -A1 -- '--> RETR 1' $MP/stls-user.log | grep -q -- '--> RETR 2'"
mpop_run implicit "$SSLP" implicit scram-sha-256 on
check "B:mpop-implicit-tls" bu compare "$MP/implicit" rfc lf "$ALL_RFC"
mpop_run untrusted "$STLS" stls-system-ca user on
check "B:mpop-untrusted-cert-refused" bash -c "[ -z \"\$(ls $MP/untrusted/new)\" ] && grep -qi 'certificate' $MP/untrusted.log"
if start_fake mpdel --preset rfc --tls stls; then
    mpop_run nokeep "$FPORT" stls scram-sha-256 off
    check "B:mpop-nokeep-bytes" bu compare "$MP/nokeep" rfc lf "$ALL_RFC"
    check "B:mpop-nokeep-deleted" stat_is "$FPORT" stls 0
    check "B:mpop-nokeep-dele-then-quit" bu dele-before-quit "$B/mpdel.err"
fi

# -- getmail6 (refuses to deliver as root: runs as nobody) -------------------------------------
GM=$B/getmail
mkdir -p "$GM"
# getmail_run NAME PORT RETRIEVER EXTRA-RETRIEVER-LINES DELETE
getmail_run() {
    local name=$1 port=$2 type=$3 extra=$4 delete=$5
    mkdir -p "$GM/$name/md/new" "$GM/$name/md/cur" "$GM/$name/md/tmp"
    printf '[retriever]\ntype = %s\nserver = 127.0.0.1\nport = %s\nusername = hogehoge\npassword = fugafuga\ntimeout = 30\n%s\n[destination]\ntype = Maildir\npath = %s/md/\n\n[options]\nverbose = 2\nread_all = false\ndelete = %s\ndelivered_to = false\nreceived = false\nmessage_log_syslog = false\n' \
        "$type" "$port" "$extra" "$GM/$name" "$delete" >"$GM/$name/rc"
    chown -R 65534:65534 "$GM/$name"
    chmod 600 "$GM/$name/rc"
    timeout 120 setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$GM/$name" \
        getmail --getmaildir "$GM/$name" --rcfile "$GM/$name/rc" >>"$GM/$name.log" 2>&1
}
getmail_run om-apop "$OM" SimplePOP3Retriever "use_apop = True" false
check "B:getmail-operamail-apop-exit-0" test $? = 0
check "B:getmail-operamail-apop-bytes" bu compare "$GM/om-apop/md" operamail fields "$ALL_OM" return-path
check "B:getmail-operamail-keep" stat_is "$OM" none "$N_OM"
getmail_run rfc-user "$RFC" SimplePOP3Retriever "" false
check "B:getmail-rfc-user-pass" bu compare "$GM/rfc-user/md" rfc fields "$ALL_RFC" return-path
getmail_run rfc-user "$RFC" SimplePOP3Retriever "" false
check "B:getmail-read_all-false-fetches-only-new" bu compare "$GM/rfc-user/md" rfc fields "$ALL_RFC" return-path
getmail_run implicit "$SSLP" SimplePOP3SSLRetriever "ca_certs = $FAKECA" false
check "B:getmail-implicit-tls-verified" bu compare "$GM/implicit/md" rfc fields "$ALL_RFC" return-path
if start_fake gmdel; then
    getmail_run delete "$FPORT" SimplePOP3Retriever "use_apop = True" true
    check "B:getmail-delete-bytes" bu compare "$GM/delete/md" operamail fields "$ALL_OM" return-path
    check "B:getmail-delete-deleted" stat_is "$FPORT" none 0
    check "B:getmail-delete-dele-then-quit" bu dele-before-quit "$B/gmdel.err"
fi

# -- every fakeserver transcript: the command verbs real clients used --------------------------
echo "verbs used by the clients: $(cat "$B"/*.err | bu verbs /dev/stdin)"
check "B:fakeserver-sessions-no-traceback" bash -c "! grep -l 'Traceback' $B/*.err"
# Ctrl-C stops the command-line server cleanly (exit status 0 or 130, no traceback)
sigint_stops() {
    local pid=$1 i state
    kill -INT "$pid" || return 1
    for i in $(seq 100); do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)
        [ -z "$state" ] || [ "$state" = Z ] && break
        sleep 0.1
    done
    [ -z "$state" ] || [ "$state" = Z ] || { echo "still running 10 s after SIGINT"; return 1; }
    wait "$pid"
    local rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 130 ] || { echo "exit status $rc"; return 1; }
}
# in this shell, not in check's subshell: only the parent can wait for its child
if sigint_stops "$OM_PID" >"$B/sigint.txt" 2>&1; then
    pass "B:fakeserver-stops-on-sigint"
else
    fail "B:fakeserver-stops-on-sigint" "$(cat "$B/sigint.txt")"
fi
check "B:fakeserver-sigint-no-traceback" bash -c "! grep -q Traceback $B/om.err"

more_run

# ---------------------------------------------------------------------------------------------
echo "== $PASSES passed, $FAILS failed"
for name in "${FAILED[@]}"; do echo "   failed: $name"; done
[ "$FAILS" = 0 ]
