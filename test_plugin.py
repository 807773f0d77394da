"""The pytest plugin in fakeserver.py, run the way a user runs it (pytester, in process).

Each test writes a small test file that uses the plugin through `pytest_plugins = ["fakeserver"]`
in a conftest.py, runs pytest on it, and checks the outcome and the report.
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent
CONFTEST = 'pytest_plugins = ["fakeserver"]\n'
# The password the user's tests log in with is assembled at run time, so that a report that
# shows the test's source cannot be what put it there.
HEADER = """
import poplib, ssl
import pytest

SECRET = "Sesame" + "-42"

def login(server, password=SECRET, **kwargs):
    pop = poplib.POP3(server.host, server.port, timeout=5, **kwargs)
    try:
        pop.user("hogehoge")
        pop.pass_(password)
    except BaseException:
        pop.close()
        raise
    return pop
"""


@pytest.fixture
def run(pytester: pytest.Pytester) -> object:
    def run_tests(source: str, *args: str) -> pytest.RunResult:
        pytester.makeconftest(CONFTEST)
        pytester.makepyfile(test_user=HEADER + source)
        return pytester.runpytest("-p", "no:cacheprovider", *args)

    return run_tests


def test_the_three_line_test_of_the_readme(run: object) -> None:
    result = run("""
def test_my_fetcher(pop3_server):
    pop = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    pop.user("hogehoge"); pop.pass_("fugafuga"); assert pop.stat()[0] == 3; pop.quit()
    assert pop3_server.sessions[0].state == "UPDATE"
""")
    result.assert_outcomes(passed=1)


def test_marker_configures_the_ready_server_with_tls(run: object) -> None:
    result = run("""
@pytest.mark.pop3_server("operamail", tls="implicit")
def test_tls(pop3_server, pop3_ca_file):
    context = pop3_server.ssl_context_for_clients()
    pop = poplib.POP3_SSL("localhost", pop3_server.port, timeout=5, context=context)
    pop.user("hogehoge"); pop.pass_("fugafuga")
    assert pop.stat() == (2, 10180)
    pop.quit()
    log = pop3_server.sessions[0]
    assert log.tls and log.login == "USER" and log.quit
    assert pop3_ca_file.read_text() == __import__("fakeserver").CA_PEM

def test_default_is_rfc(pop3_server):
    assert pop3_server.preset == "rfc" and pop3_server.tls is None
""")
    result.assert_outcomes(passed=2)


def test_factory_with_messages_deletions_commands_and_sasl(run: object) -> None:
    result = run("""
from email.message import EmailMessage

def test_factory(make_pop3_server, tmp_path):
    mail = EmailMessage()
    mail["Subject"] = "hi"
    mail.set_content("body")
    server = make_pop3_server(messages=[mail, b"Subject: two\\r\\n\\r\\n2\\r\\n"], password=SECRET)
    other = make_pop3_server("operamail")
    assert server.port != other.port
    pop = login(server)
    pop.dele(1)
    pop.rset()
    pop.dele(2)
    assert server.deleted == []          # marked, not deleted: only QUIT deletes
    pop.quit()
    assert server.deleted == [b"Subject: two\\r\\n\\r\\n2\\r\\n"]
    assert server.commands == ["USER hogehoge", "PASS ****", "DELE 1", "RSET", "DELE 2", "QUIT"]
    assert server.sessions[0].state == "UPDATE"
    pop = poplib.POP3(server.host, server.port, timeout=5)
    pop._shortcmd("AUTH CRAM-MD5")      # a client that leaves in the middle of a login
    pop.close()
    import time
    for _ in range(500):
        if server.sessions[1].closed:
            break
        time.sleep(0.01)
    assert server.sessions[1].state == "AUTHORIZATION" and not server.sessions[1].quit

def test_mail_from_a_maildir(make_pop3_server, tmp_path):
    import mailbox
    box = mailbox.Maildir(str(tmp_path / "md"))
    box.add(b"Subject: from maildir\\n\\nhello\\n")
    server = make_pop3_server(maildir=tmp_path / "md", faults=[
        __import__("fakeserver").Fault("in-use", "PASS", times=1)])
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        login(server, "fugafuga")   # (login() closes what it opened when it fails)
    pop = login(server, "fugafuga")
    assert pop.retr(1)[1][0] == b"Subject: from maildir"
    pop.quit()
""")
    result.assert_outcomes(passed=2)


def test_a_failing_test_shows_the_transcript_without_secrets(run: object) -> None:
    result = run("""
@pytest.mark.pop3_server(preset="rfc", password=SECRET)
def test_fails(pop3_server):
    pop = login(pop3_server)
    pop.retr(2)
    count = pop.stat()[0]
    pop.close()
    assert count == 99
""", "--tb=short")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*- fakeserver transcript -*",
        "server 1 (127.0.0.1:*, preset rfc): 1 connection(s)",
        "  connection 1: ended in TRANSACTION, no QUIT",
        "    S: +OK fakeserver POP3 server ready <*>",
        "    C: USER hogehoge",
        "    C: PASS ****",
        "*C: RETR 2",
    ])
    assert "Sesame-42" not in result.stdout.str()


def test_a_passing_test_shows_no_transcript(run: object) -> None:
    result = run("""
def test_passes(pop3_server):
    login(pop3_server, "fugafuga").quit()
""", "-rA")
    result.assert_outcomes(passed=1)
    assert "fakeserver transcript" not in result.stdout.str()


def test_an_exception_in_a_session_fails_the_test_that_caused_it(run: object) -> None:
    result = run("""
import fakeserver

def test_causes_it(pop3_server, monkeypatch):
    def broken(self, args):
        raise RuntimeError("the server broke on NOOP")
    monkeypatch.setattr(fakeserver._Pop3, "cmd_noop", broken)
    pop = login(pop3_server, "fugafuga")
    with pytest.raises(Exception):
        pop.noop()                 # the client only sees the connection end
    pop.close()

def test_next_one_is_not_blamed(pop3_server):
    login(pop3_server, "fugafuga").quit()
""", "--tb=short")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*a fakeserver session raised:*",
        "*RuntimeError: the server broke on NOOP*",
        "FAILED test_user.py::test_causes_it*",
    ])


def test_replay_mismatches_are_in_the_report(run: object) -> None:
    result = run("""
import fakeserver

@pytest.mark.pop3_server(replay=fakeserver.OPERAMAIL_RECORDING)
def test_replayed(pop3_server):
    pop = login(pop3_server, "fugafuga")
    with pytest.raises(poplib.error_proto):
        pop.noop()
    pop.close()
    assert pop3_server.mismatches == []
""", "--tb=short")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "server 1 (127.0.0.1:*, replay): 1 connection(s)",
        "  replay: connection 1 sent 'NOOP', which the recording has no answer for",
    ])


def test_the_module_imports_without_pytest() -> None:
    code = ("import sys; sys.modules['pytest'] = None; import fakeserver; "
            "assert fakeserver.FakeServer; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(HERE), capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_pyproject_registers_the_plugin_for_installed_users() -> None:
    text = (HERE / "pyproject.toml").read_text(encoding="utf-8")
    assert '[project.entry-points.pytest11]\nfakeserver = "fakeserver"\n' in text


def test_the_fixtures_are_clean_under_w_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=HEADER + """
def test_every_fixture(pop3_server, make_pop3_server, pop3_ca_file):
    assert pop3_ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    login(make_pop3_server(password=SECRET)).quit()
    login(pop3_server, "fugafuga").quit()

def test_the_session_fixture_again(pop3_ca_file):
    assert pop3_ca_file.exists()
""")
    monkeypatch.setenv("PYTHONPATH", str(HERE))  # a process of its own, as above
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=2)


def test_a_relative_replay_path_is_the_test_files(pytester: pytest.Pytester) -> None:
    import fakeserver

    pytester.makeconftest(CONFTEST)
    folder = pytester.mkpydir("tests")
    (folder / "seed.pop3").write_text(fakeserver.OPERAMAIL_RECORDING, encoding="utf-8")
    (folder / "test_replayed.py").write_text(HEADER + """
@pytest.mark.pop3_server(replay="seed.pop3")
def test_replayed(pop3_server):
    pop = login(pop3_server, "fugafuga")
    assert pop.stat() == (2, 10180)
    pop.quit()
""")
    # Run from the directory above: the path is not the working directory's.
    result = pytester.runpytest("-p", "no:cacheprovider", "tests")
    result.assert_outcomes(passed=1)


def readme_examples() -> str:
    """The Python examples of the README's sections on the fake server, in order."""
    text = (HERE / "README.md").read_text(encoding="utf-8")
    start = text.index("## The fake server in your own tests")
    sections = text[start : text.index("\n## Robustness", start)]  # and "Testing code that ..."
    return "\n\n".join(re.findall(r"```python\n(.*?)```", sections, re.S))


def test_the_readme_examples_run_as_written(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fakeserver

    source = readme_examples()
    assert source.count("def test_") == 5 and "pytest.raises(poplib.error_proto)" in source
    pytester.makeconftest(CONFTEST)
    folder = pytester.mkpydir("tests")
    (folder / "test_readme.py").write_text(source, encoding="utf-8")
    # The recording the replay example serves: the README's fetch_new_mail through the proxy.
    namespace: dict[str, Any] = {}
    exec(compile(source.split("def test_my_mail_fetcher")[0], "README", "exec"), namespace)
    with fakeserver.FakeServer("rfc") as server:
        with fakeserver.Recorder("127.0.0.1:%d" % server.port, folder / "odd-server.pop3",
                                 tls="none") as proxy:
            namespace["fetch_new_mail"](*proxy.address, "hogehoge", "fugafuga")
    # In a process of its own: in this one fakeserver is imported already, which pytest would
    # warn about (it cannot rewrite its asserts), and -W error would make that an error.
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", "tests")
    result.assert_outcomes(passed=5)
