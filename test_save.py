"""Tests of save (issue 12): the Delivery section of pop3lite and the command line's save.

Kill tests run ``python pop3lite.py ... save`` as a subprocess against a fake server in this
process and signal it at seeded random moments; the rest drive pop3lite.save() in-process.
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import fakeserver
import pop3lite
from conftest import wait_until
from fakeserver import FakeServer, Fault, Maildrop

try:
    import tracemalloc
except ImportError:  # PyPy: memory is not measured there; the behaviour still is
    tracemalloc = None  # type: ignore[assignment]

HERE = Path(__file__).resolve().parent
PASSWORD = "secret-pw"
posix_only = pytest.mark.skipif(os.name != "posix", reason="signals and fsync counts are POSIX")


@pytest.fixture(autouse=True)
def alice_password(monkeypatch: pytest.MonkeyPatch, cli_environment: Path) -> None:
    """The command line's environment, with alice's password in $POP3_PASSWORD."""
    monkeypatch.setenv("POP3_PASSWORD", PASSWORD)


def make_messages(count: int, seed: int) -> list[bytes]:
    """Messages of varied sizes (100 octets to ~300 KiB), each unique, some with lines that
    start with "." or "From "."""
    rng = random.Random(seed)
    messages = []
    for index in range(count):
        size = int(10 ** rng.uniform(2, 5.5))
        line = b"%d " % index + b"x" * 70 + b"\r\n"
        body = (line * (size // len(line) + 1))[:size]
        body += b".dot line\r\nFrom the start of a line\r\nend\r\n"
        messages.append(
            b"Message-ID: <%d@test>\r\nSubject: message %d\r\n\r\n" % (index, index) + body
        )
    return messages


def as_stored(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


def maildir_contents(path: Path) -> list[bytes]:
    found = []
    for sub in ("new", "cur"):
        for name in sorted(os.listdir(path / sub)):
            found.append((path / sub / name).read_bytes())
    return found


def server_with(messages: list[bytes], **options: Any) -> FakeServer:
    users = {"alice": Maildrop(PASSWORD, messages, uids=[f"uid-{n}" for n in range(len(messages))])}
    return FakeServer("rfc", users=users, **options)


def command_line(server: FakeServer, target: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "pop3lite.py"),
        f"{server.host}:{server.port}",
        "alice",
        "save",
        str(target),
        *extra,
    ]


def run_until_done(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run to completion; a server that has not yet noticed a killed session says IN-USE
    (exit 5) for a moment, so that is tried again a bounded number of times."""
    for _ in range(50):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 5:
            return done
        time.sleep(0.1)
    return done


def kill_and_rerun(
    argv: list[str], signum: int, seed: int, kills: int
) -> tuple[list[int], subprocess.CompletedProcess[str]]:
    """Start the save ``kills`` times, signalling it at a seeded random moment each time,
    then let it finish. Returns the exit statuses of the signalled runs and the last run."""
    rng = random.Random(seed)
    env = dict(os.environ, POP3_PASSWORD=PASSWORD)
    statuses = []
    for _ in range(kills):
        process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(rng.uniform(0.1, 0.6))
        if process.poll() is None:
            process.send_signal(signum)
        _, err = process.communicate(timeout=30)
        assert "Traceback" not in err
        statuses.append(process.returncode)
    return statuses, run_until_done(argv, env)


# -- crash safety ----------------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_maildir_save_loses_nothing_and_doubles_nothing(
    tmp_path: Path, signum: int
) -> None:
    messages = make_messages(40, seed=signum)
    target = tmp_path / "Mail"
    # A little delay per RETR spreads the save over the moments the signals land in.
    with server_with(messages, faults=[Fault("delay", "RETR", 0.03)]) as server:
        argv = command_line(server, target, "--new", "--delete")
        statuses, last = kill_and_rerun(argv, signum, seed=1200 + signum, kills=7)
        assert last.returncode == 0, last.stderr
        assert server.maildrops["alice"].messages == []
    assert statuses.count(0) < len(statuses)  # most signals landed in the middle of a save
    if signum == signal.SIGTERM:  # handled as Ctrl-C is: no QUIT, its own exit status
        assert 143 in statuses and set(statuses) <= {0, 143, -signal.SIGTERM, 5}
    assert sorted(maildir_contents(target)) == sorted(as_stored(m) for m in messages)
    assert os.listdir(target / "tmp") == []


@posix_only
def test_a_killed_mbox_save_doubles_at_most_the_message_in_flight(tmp_path: Path) -> None:
    messages = make_messages(30, seed=7)
    target = tmp_path / "mail.mbox"
    with server_with(messages, faults=[Fault("delay", "RETR", 0.03)]) as server:
        argv = command_line(server, target, "--new", "--delete")
        statuses, last = kill_and_rerun(argv, signal.SIGKILL, seed=99, kills=6)
        assert last.returncode == 0, last.stderr
        assert server.maildrops["alice"].messages == []
    killed = sum(1 for status in statuses if status == -signal.SIGKILL)
    assert killed >= 3
    text = target.read_bytes()
    found = [m for m in text.split(b"\nFrom ") if m]
    for message in messages:  # every message is there, whole
        assert b"\nSubject: message %d\n" % messages.index(message) in text
    assert len(found) <= len(messages) + killed  # at most one extra per kill
    assert not (tmp_path / "mail.mbox.lock").exists()


def test_a_message_on_disk_without_its_journal_line_is_not_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = make_messages(5, seed=3)
    target = tmp_path / "Mail"
    with server_with(messages) as server:
        save(server, target, new=True)
        journal = next(target.glob(".pop3lite-*.journal"))
        header = journal.read_text().splitlines()[0]
        journal.write_text(header + "\n")  # as if killed before any journal line was written
        (target / "tmp" / "leftover").write_bytes(b"not ours: kept")
        ours = next(iter(os.listdir(target / "new")))
        (target / "tmp" / ours).write_bytes(b"ours, cut short")
        events: list[str] = []
        real_fsync_directory = pop3lite._fsync_directory
        real_append = pop3lite._Journal.append

        def fsync_directory(path: str) -> None:
            events.append(os.path.basename(path))
            real_fsync_directory(path)

        def append(journal: Any, keys: Any, sync: bool = False) -> None:
            keys = list(keys)
            events.append(f"journal {len(keys)}")
            real_append(journal, keys, sync)

        monkeypatch.setattr(pop3lite, "_fsync_directory", fsync_directory)
        monkeypatch.setattr(pop3lite._Journal, "append", append)
        report = save(server, target, new=True)
    assert report.saved == 0 and report.already == 5
    assert sorted(maildir_contents(target)) == sorted(as_stored(m) for m in messages)
    assert os.listdir(target / "tmp") == ["leftover"]
    assert len(journal.read_text().splitlines()) == 6  # the file names rebuilt the journal
    # A kill between a rename and the fsync of new/ left the names undurable: made durable
    # before the journal names them.
    assert events.index("new") < events.index("journal 5")
    assert events.index("cur") < events.index("journal 5")


def test_a_write_failure_cuts_the_mbox_back_and_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = make_messages(3, seed=5)
    target = tmp_path / "mail.mbox"
    original = pop3lite.Mbox.finish
    calls = []

    def failing(box: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        original(box)

    monkeypatch.setattr(pop3lite.Mbox, "finish", failing)
    with server_with(messages) as server:
        with pytest.raises(OSError, match="No space"):
            save(server, target, new=True, delete=True)
        assert len(server.maildrops["alice"].messages) == 3
        assert not [c for c in server.sessions[-1].commands if c.startswith(("DELE", "QUIT"))]
    assert target.read_bytes().count(b"\nSubject: message") == 1  # the second was cut off


def test_a_failed_sync_journals_only_what_reached_new_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = make_messages(5, seed=12)
    target = tmp_path / "Mail"
    real_sync = pop3lite._sync_data
    calls = []

    def failing(descriptor: int) -> None:
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_sync(descriptor)

    with server_with(messages) as server:
        monkeypatch.setattr(pop3lite, "_sync_data", failing)
        with pytest.raises(OSError, match="Input/output"):
            save(server, target, new=True, delete=True)
        monkeypatch.setattr(pop3lite, "_sync_data", real_sync)
        journal = next(target.glob(".pop3lite-*.journal"))
        assert len(journal.read_text().splitlines()) == 1  # nothing journaled on the way out
        assert os.listdir(target / "new") == []  # a failed batch stays in tmp/, unrenamed
        report = save(server, target, new=True, delete=True)
        assert report.saved == 5 and report.deleted == 5
        assert server.maildrops["alice"].messages == []
    assert sorted(maildir_contents(target)) == sorted(as_stored(m) for m in messages)
    assert os.listdir(target / "tmp") == []


@pytest.mark.parametrize("kind", ["Maildir", "mbox"])
def test_every_save_records_so_a_second_one_saves_nothing_and_new_false_fetches_again(
    tmp_path: Path, kind: str
) -> None:
    # Issue 19 item 9: `save DIR` then `save DIR --new` saved every message twice.
    messages = make_messages(3, seed=13)
    target = tmp_path / ("mail.mbox" if kind == "mbox" else "Mail")
    with server_with(messages) as server:
        assert save(server, target).saved == 3
        second = save(server, target)
        assert second.saved == 0 and second.already == 3
        assert save(server, target, new=True).saved == 0
        again = save(server, target, new=False)  # asked for: every message once more
        assert again.saved == 3 and again.already == 0
        assert save(server, target).saved == 0
    if kind == "mbox":
        assert target.read_bytes().count(b"\nSubject: message") == 6
        return
    names = os.listdir(target / "new")
    assert len([n for n in names if ",pop3lite=" in n]) == 6
    assert not [n for n in names if ",U=" in n or ",I=" in n]  # mbsync reads ",U="


def test_a_message_is_deleted_for_an_earlier_run_only_while_its_file_is_there(
    tmp_path: Path,
) -> None:
    messages = make_messages(3, seed=14)
    target = tmp_path / "Mail"
    with server_with(messages) as server:
        save(server, target, new=True)
        gone = sorted(os.listdir(target / "new"))[0]
        (target / "new" / gone).unlink()  # the user removed it: the server's copy stays
        report = save(server, target, new=True, delete=True)
        assert report.saved == 0 and report.already == 3 and report.deleted == 2
        assert len(server.maildrops["alice"].messages) == 1


def test_shared_uids_are_told_apart_by_size_and_unlisted_ones_never_crash(
    tmp_path: Path,
) -> None:
    messages = make_messages(6, seed=15)
    messages[4] = messages[3]  # the same UID and the same size: cannot be told apart
    # As a server that breaks RFC 1939's uniqueness (and one with a long UID) lists them;
    # None: UIDL skips the message.
    listed: list[str | None] = ["same", "same", "solo", "twin", "twin", "x" * 30 + "/" * 40]

    def save_listing(server: FakeServer) -> pop3lite.SaveReport:
        with client(server) as pop:
            real_scan = pop.scan

            def scan() -> Any:
                stat, sizes, _ = real_scan()
                uids = ((n, u) for n, u in zip(sorted(sizes), listed) if u is not None)
                return stat, sizes, pop3lite.UIDList(uids)

            pop.scan = scan  # type: ignore[method-assign]
            return pop3lite.save(pop, str(target), new=True)

    target = tmp_path / "Mail"
    with server_with(messages) as server:
        assert save_listing(server).saved == 6
        assert save_listing(server).saved == 2  # only the indistinguishable twins
        names = os.listdir(target / "new")
        assert max(len(n) for n in names) < 200  # a long unsafe UID becomes a short key
        assert len([n for n in names if "-same#" in n]) == 2
        listed[2] = None
        assert save_listing(server).saved == 3  # the twins and the one without a UID


def test_journal_is_not_rewritten_when_nothing_changed(tmp_path: Path) -> None:
    target = tmp_path / "Mail"
    messages = [b"Subject: %d\r\n\r\nx\r\n" % n for n in range(300)]
    with server_with(messages) as server:
        save(server, target, new=True, delete=True)
        journal = next(target.glob(".pop3lite-*.journal"))
        inodes = []
        for run in range(3):
            server.maildrops["alice"].add(b"Subject: new %d\r\n\r\nx\r\n" % run)
            save(server, target, new=True, delete=True)
            inodes.append(os.stat(journal).st_ino)
            lines = len(journal.read_text().splitlines())
    assert inodes[1] == inodes[2]  # compacted once, then only appended to
    assert lines <= 4


# -- state identity --------------------------------------------------------------------------


def test_two_loopback_ports_are_two_servers_and_similar_names_two_accounts(
    tmp_path: Path,
) -> None:
    target = tmp_path / "Mail"
    with server_with(make_messages(3, seed=16)) as first:
        with server_with(make_messages(3, seed=17)) as second:  # the same UIDs
            for server in (first, second):
                report = save(server, target, new=True, delete=True)
                assert report.saved == 3 and report.deleted == 3
    assert len(maildir_contents(target)) == 6
    other = tmp_path / "Other"
    with server_with(make_messages(2, seed=18)) as server:
        for user in ("a+b", "a_b"):
            with client(server) as pop:
                assert pop3lite.save(pop, str(other), new=True, user=user).saved == 2
        journals = sorted(other.glob(".pop3lite-*.journal"))
        assert len(journals) == 2
        journals[0].write_bytes(journals[1].read_bytes())  # another account's journal
        with client(server) as pop, pytest.raises(OSError, match="move it away"):
            pop3lite.save(pop, str(other), new=True, user="a+b")
            pop3lite.save(pop, str(other), new=True, user="a_b")


# -- the mbox format -------------------------------------------------------------------------


def test_mbox_from_lines_carry_the_sender_and_date_and_from_lines_are_quoted(
    tmp_path: Path,
) -> None:
    message = (
        b"Return-Path: <bounce@example.org>\r\nFrom: Alice <alice@example.com>\r\n"
        b"Date: Sat, 19 Jan 2002 21:33:05 +0900\r\nSubject: hi\r\n\r\n"
        b"From here\r\n>From there\r\n>>From afar\r\nFrom\r\n.\r\n"
    )
    bounce = b"Return-Path: <>\r\nFrom: x@example.com\r\nSubject: bounce\r\n\r\nbody\r\n"
    target = tmp_path / "mail.mbox"
    with server_with([message, bounce]) as server:
        save(server, target)
    text = target.read_bytes()
    first, second = text.split(b"\n\nFrom ")
    assert first.startswith(b"From bounce@example.org Sat Jan 19 12:33:05 2002\n")
    assert first.endswith(b"\n>From here\n>>From there\n>>>From afar\nFrom\n.")
    assert second.startswith(b"MAILER-DAEMON ")
    assert text.endswith(b"body\n\n")


def test_from_lines_never_glue_a_folded_address_nor_take_an_impossible_year() -> None:
    folded = pop3lite._from_line(b"From: x@y\n\tcontinued\nDate: Sat, 19 Jan 10000 21:33:05 +0900")
    assert folded.startswith(b"From MAILER-DAEMON ") and b"10000" not in folded
    assert b"x@ycontinued" not in folded
    early = pop3lite._from_line(b"From: Al\n <al@example.com>\nDate: 1 Jan 1960 00:00:00 +0000")
    assert early.startswith(b"From al@example.com ") and b"1960" not in early
    fine = pop3lite._from_line(b"From: Al\n <al@example.com>\nDate: 1 Jan 1999 00:00:00 +0000")
    assert fine == b"From al@example.com Fri Jan  1 00:00:00 1999\n"


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1 << 20])
def test_local_lines_are_the_same_whatever_the_pieces(piece: int) -> None:
    data = b"a\r\nFrom x\r\n>From y\r\nb\rc\r\n>>>>From z\r\nFrom\r\nFro\r\nFrom  \r\n" * 3
    out: list[bytes] = []
    lines = pop3lite._LocalLines(out.append, True, lambda n: None)
    for start in range(0, len(data), piece):
        lines.write(data[start : start + piece])
    lines.finish()
    expected = (b"a\n>From x\n>>From y\nb\rc\n>>>>>From z\nFrom\nFro\n>From  \n") * 3
    assert b"".join(out) == expected


# -- locks -----------------------------------------------------------------------------------


def test_a_stale_mbox_lock_is_taken_over_and_a_live_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pop3lite, "_LOCK_WAIT", 0.3)
    target = tmp_path / "mail.mbox"
    lock = tmp_path / "mail.mbox.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    lock.write_text(f"{dead.pid}\n")
    with server_with(make_messages(2, seed=1)) as server:
        argv = [f"{server.host}:{server.port}", "alice", "save", str(target)]
        assert pop3lite.main(argv) == 0
        _, err = capsys.readouterr()
        assert "stale lock" in err and str(dead.pid) in err and "no longer runs" in err
        assert not lock.exists()

        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            lock.write_text(f"{live.pid}\n")
            assert pop3lite.main(argv) == 1
            _, err = capsys.readouterr()
            assert f"held by process {live.pid}, which is still running" in err
            assert lock.read_text() == f"{live.pid}\n"  # not touched
        finally:
            live.kill()
            live.wait(timeout=30)
    assert target.read_bytes().count(b"\nSubject: message") == 2


def test_a_lock_from_before_the_boot_is_stale_and_a_live_holder_is_waited_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if sys.platform.startswith("linux"):
        boot = pop3lite._boot_time()
        assert boot is not None and 0 < boot < time.time()
    target = tmp_path / "mail.mbox"
    lock = tmp_path / "mail.mbox.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with server_with(make_messages(2, seed=19)) as server:
            argv = [f"{server.host}:{server.port}", "alice", "save", str(target)]
            # A live pid in a lock made before the system started: another process now.
            lock.write_text(f"{live.pid}\n")
            os.utime(lock, (time.time() - 7200, time.time() - 7200))
            monkeypatch.setattr(pop3lite, "_boot_time", lambda: time.time() - 3600)
            assert pop3lite.main(argv) == 0
            assert "made before the system started" in capsys.readouterr().err
            assert not lock.exists()

            lock.write_text(f"{live.pid}\n")  # made after the boot: live, waited for
            monkeypatch.setattr(pop3lite, "_LOCK_WAIT", 20.0)
            release = threading.Timer(0.5, lock.unlink)
            release.start()
            try:
                assert pop3lite.main(argv) == 0
            finally:
                release.cancel()
                release.join(30)
            assert "stale" not in capsys.readouterr().err
    finally:
        live.kill()
        live.wait(timeout=30)
    assert target.read_bytes().count(b"\nSubject: message") == 2  # the second run: none new


# -- streaming -------------------------------------------------------------------------------


class LargeMessageServer:
    """A scripted POP3 server with one message of ``size`` octets, generated while it is sent
    (so the server's memory does not count in the client's peak)."""

    LINE = b"y" * 1022 + b"\r\n"

    def __init__(self, size: int) -> None:
        self.size = size - size % len(self.LINE)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        connection, _ = self.listener.accept()
        connection.settimeout(30)
        with connection, connection.makefile("rb") as reader:
            connection.sendall(b"+OK ready\r\n")
            for _ in range(100):
                line = reader.readline(512).strip().upper()
                if not line:
                    return
                verb = line.split()[0]
                if verb == b"CAPA":
                    connection.sendall(b"+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n")
                elif verb in (b"USER", b"PASS"):
                    connection.sendall(b"+OK\r\n")
                elif verb == b"STAT":
                    connection.sendall(b"+OK 1 %d\r\n" % self.size)
                elif verb == b"LIST":
                    connection.sendall(b"+OK\r\n1 %d\r\n.\r\n" % self.size)
                elif verb == b"UIDL":
                    connection.sendall(b"+OK\r\n1 big-one\r\n.\r\n")
                elif verb == b"RETR":
                    connection.sendall(b"+OK %d octets\r\n" % self.size)
                    chunk = self.LINE * 64
                    for _ in range(self.size // len(chunk)):
                        connection.sendall(chunk)
                    connection.sendall(self.LINE * (self.size % len(chunk) // len(self.LINE)))
                    connection.sendall(b".\r\n")
                elif verb == b"QUIT":
                    connection.sendall(b"+OK bye\r\n")
                    return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def peak_memory_saving(size: int, target: Path) -> int | None:
    server = LargeMessageServer(size)
    try:
        # A per-message memory limit far below the message: save must not be bound by it.
        with pop3lite.POP3("127.0.0.1", server.port, tls="none", max_message_size=1 << 20) as pop:
            pop.login("alice", PASSWORD)
            if tracemalloc is None:
                report, peak = pop3lite.save(pop, str(target)), None
            else:
                tracemalloc.start()
                try:
                    report = pop3lite.save(pop, str(target))
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
    finally:
        server.close()
    assert report.saved == 1 and report.octets == server.size
    (stored,) = maildir_contents(target)
    assert len(stored) == server.size // 1024 * 1023
    return peak


def test_a_huge_message_is_saved_whole_in_the_memory_of_a_small_one(tmp_path: Path) -> None:
    small = peak_memory_saving(1024, tmp_path / "small")
    large = peak_memory_saving(64 << 20, tmp_path / "large")
    if small is not None and large is not None:
        assert large < small + (4 << 20)  # 64 MiB through a few MiB of buffers


def test_retr_many_to_drains_a_message_over_max_size_and_goes_on() -> None:
    messages = make_messages(3, seed=11)
    sinks: dict[int, io.BytesIO] = {}

    def open_sink(number: int) -> io.BytesIO:
        sinks[number] = io.BytesIO()
        return sinks[number]

    limit = max(len(messages[0]), len(messages[2]))
    messages[1] = messages[1] + b"z" * (limit + 10) + b"\r\n"
    with server_with(messages) as server, client(server) as pop:
        results = list(pop.retr_many_to([1, 2, 3], open_sink, max_size=limit))
        assert pop.stat().count == 3  # still in step
        pop.quit()
    assert [r.number for r in results] == [1, 2, 3]
    assert results[0].error is None and results[2].error is None
    assert isinstance(results[1].error, pop3lite.LimitExceeded)
    assert results[1].octets == len(messages[1])
    assert sinks[1].getvalue() == messages[0] and sinks[3].getvalue() == messages[2]
    assert len(sinks[2].getvalue()) <= limit


def test_max_size_skips_reports_and_keeps_the_big_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeServer(idle_timeout=10) as server:  # the seed: 5954 and 4226 octets
        monkeypatch.setenv("POP3_PASSWORD", "fugafuga")
        argv = [f"{server.host}:{server.port}", "hogehoge", "save", str(tmp_path / "M")]
        status = pop3lite.main([*argv, "--delete", "--max-size", "5K"])
        out, err = capsys.readouterr()
        assert status == 7
        assert "saved 1 message" in out and "deleted 1 message" in out
        assert "skipped 1 message larger than --max-size 5.0 KiB" in err and "1 (5.8 KiB)" in err
        assert server.maildrops["hogehoge"].messages == [fakeserver.OPERAMAIL_MESSAGES[0]]
        assert "RETR 1" not in server.sessions[-1].commands  # LIST said it was too large


# -- fsyncs and round trips ------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize(
    "kind, new, expected",
    [
        ("Maildir", True, 20 + 8),  # a file each; 5 for the new layout, 1 journal creation,
        #                             1 new/ and 1 journal before the end
        ("Maildir", False, 20 + 8),  # new=False (--all) records too, at the same cost
        ("mbox", True, 20 * 2 + 2),  # the mbox, then the journal after each message; the
        #                              folder twice (the mbox and the journal created)
        ("mbox", False, 20 * 2 + 2),
    ],
)
def test_fsyncs_once_per_message_where_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, new: bool, expected: int
) -> None:
    calls = []
    real_fsync = os.fsync

    def counting(descriptor: int) -> None:
        calls.append(descriptor)
        real_fsync(descriptor)

    target = tmp_path / ("mail.mbox" if kind == "mbox" else "Mail")
    with server_with(make_messages(20, seed=2)) as server:
        monkeypatch.setattr(os, "fsync", counting)
        if hasattr(os, "fdatasync"):
            monkeypatch.setattr(os, "fdatasync", counting)
        report = save(server, target, new=new)
    assert report.saved == 20 and report.kind == kind
    assert len(calls) == expected


def test_one_capa_and_stat_list_uidl_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_send = pop3lite._Transport.send

    def recording(transport: Any, data: bytes) -> None:
        writes.append(data)
        real_send(transport, data)

    monkeypatch.setattr(pop3lite._Transport, "send", recording)
    with server_with(make_messages(6, seed=4)) as server:
        report = save(server, tmp_path / "Mail", new=True, delete=True)
        sent = server.sessions[-1].commands
    assert report.saved == 6 and report.deleted == 6
    assert b"STAT\r\nLIST\r\nUIDL\r\n" in writes
    assert sent.count("CAPA") == 1  # PIPELINING before login holds after it (RFC 2449 5)
    assert b"RETR 1\r\nRETR 2\r\n" in b"".join(writes)  # pipelined
    last_retr = max(i for i, c in enumerate(sent) if c.startswith("RETR"))
    first_dele = min(i for i, c in enumerate(sent) if c.startswith("DELE"))
    assert last_retr < first_dele and sent[-1] == "QUIT"


# -- state identity and migration --------------------------------------------------------------


def test_another_name_or_port_of_the_same_server_shares_the_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "Mail"
    with server_with(make_messages(3, seed=6)) as server:
        for host in ("127.0.0.1", "localhost"):
            argv = [f"{host}:{server.port}", "alice", "save", str(target), "--new"]
            assert pop3lite.main(argv) == 0
        out, _ = capsys.readouterr()
    assert "saved 3 messages" in out and "saved 0 messages" in out
    assert len(maildir_contents(target)) == 3


def test_an_old_state_file_is_read_once_and_migrated(tmp_path: Path) -> None:
    target = tmp_path / "Mail"
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True)
    with server_with(make_messages(3, seed=8)) as server:
        legacy = target / f".pop3lite-alice@127.0.0.1_{server.port}.json"
        legacy.write_text('{"server": "x", "user": "alice", "uids": ["uid-0", "uid-1"]}\n')
        report = save(server, target, new=True)
        assert report.saved == 1 and report.already == 2
        assert not legacy.exists()
        assert save(server, target, new=True).saved == 0


# -- quiet, signals, progress ----------------------------------------------------------------


def test_quiet_prints_nothing_on_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with server_with(make_messages(2, seed=9)) as server:
        address = f"{server.host}:{server.port}"
        assert pop3lite.main([address, "alice", "save", str(tmp_path / "M"), "-q"]) == 0
        assert capsys.readouterr() == ("", "")
        assert pop3lite.main([address, "alice", "-q"]) == 0  # check: its table, no report
        out, err = capsys.readouterr()
        assert out.startswith("#") and "Server:" not in out and err == ""
        monkeypatch.setenv("POP3_PASSWORD", "wrong")
        assert pop3lite.main([address, "alice", "-q"]) == 3
        assert "login refused" in capsys.readouterr().err  # errors are still said


def test_quiet_still_says_what_was_skipped_and_which_lock_was_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "mail.mbox"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    (tmp_path / "mail.mbox.lock").write_text(f"{dead.pid}\n")
    with FakeServer(idle_timeout=10) as server:  # the seed: 5954 and 4226 octets
        monkeypatch.setenv("POP3_PASSWORD", "fugafuga")
        argv = [f"{server.host}:{server.port}", "hogehoge", "save", str(target), "-q"]
        assert pop3lite.main([*argv, "--max-size", "5K"]) == 7
    out, err = capsys.readouterr()
    assert out == ""
    assert "skipped 1 message larger than --max-size" in err
    assert "took over the stale lock" in err and str(dead.pid) in err


def test_ctrl_c_anywhere_in_main_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(argv: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pop3lite, "_parse_command_line", interrupted)
    assert pop3lite.main(["x", "y"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_progress_moves_within_a_message_and_redraws_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int, int, int]] = []
    server = LargeMessageServer(4 << 20)
    try:
        with pop3lite.POP3("127.0.0.1", server.port, tls="none") as pop:
            pop.login("alice", PASSWORD)
            target = Path(os.environ["HOME"]) / "M"
            pop3lite.save(pop, str(target), progress=lambda *a: calls.append(a))
    finally:
        server.close()
    during = [c for c in calls if c[0] == 0 and c[2] > 0]
    assert len(during) >= 4 and [c[2] for c in during] == sorted(c[2] for c in during)
    assert calls[-1][0] == 1 == calls[-1][1]

    screen = io.StringIO()
    screen.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", screen)
    progress = pop3lite._SaveProgress(True)
    progress(0, 1, 123456789, 987654321)
    progress.drawn = 0.0
    progress(1, 1, 1, 1)
    progress.finish()
    first, second, last = screen.getvalue().split("\r")[1:4]
    assert len(second) >= len(first) and second.rstrip().endswith("1 B of 1 B")
    assert last == " " * len(second.rstrip()) or last.strip() == ""


# -- delivery to a command (MDA) ---------------------------------------------------------------

# The delivery command the tests run: writes the message it reads into OUT (one file each, made
# whole by a rename), with %F beside it; BEHAVIOUR says how it ends.
MDA_SCRIPT = r"""
import os, subprocess, sys, time
out, behaviour, sender = sys.argv[1], sys.argv[2], sys.argv[3]
data = sys.stdin.buffer.read()
if behaviour == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.path.join(out, "child.pid"), "w") as file:
        file.write(str(child.pid))
    time.sleep(120)
if behaviour == "tempfail":
    sys.stderr.write("mailbox locked\n")
    sys.exit(75)
if behaviour.startswith("fail:") and behaviour[5:].encode() in data:
    sys.stderr.write("no such folder\n")
    sys.exit(1)
name = os.path.join(out, "%d-%d" % (time.time_ns(), os.getpid()))
with open(name + ".tmp", "wb") as file:
    file.write(sender.encode() + b"\n" + data)
os.rename(name + ".tmp", name + ".eml")
"""


def mda(tmp_path: Path, behaviour: str = "ok") -> list[str]:
    """argv of the test's delivery command; what it delivers goes to tmp_path/delivered."""
    script = tmp_path / "mda.py"
    script.write_text(MDA_SCRIPT)
    out = tmp_path / "delivered"
    out.mkdir(exist_ok=True)
    return [sys.executable, str(script), str(out), behaviour, "%F"]


def delivered(tmp_path: Path) -> list[tuple[bytes, bytes]]:
    """(sender, message) of every message the command received, in delivery order."""
    found = []
    for path in sorted((tmp_path / "delivered").glob("*.eml")):
        sender, _, message = path.read_bytes().partition(b"\n")
        found.append((sender, message))
    return found


def test_mda_delivers_each_message_once_on_stdin_and_journals_it(tmp_path: Path) -> None:
    messages = make_messages(4, seed=30)
    messages[1] = b"Return-Path: <bob@example.org>\r\nFrom: x@y\r\n\r\nhi\r\n"
    state = tmp_path / "state"
    with server_with(messages) as server:
        command = pop3lite.MDA(mda(tmp_path), state_dir=str(state))
        report = save(server, command)
        assert (report.saved, report.kind) == (4, "MDA")
        assert save(server, command).saved == 0
        assert len(list(state.glob("mda-alice@localhost_*.journal"))) == 1
    got = delivered(tmp_path)
    assert [message for _, message in got] == [as_stored(m) for m in messages]  # LF, no From_
    assert [sender for sender, _ in got][:2] == [b"MAILER-DAEMON", b"bob@example.org"]


def test_mda_exit_75_is_try_again_later_and_keeps_everything(tmp_path: Path) -> None:
    with server_with(make_messages(3, seed=31)) as server:
        command = pop3lite.MDA(mda(tmp_path, "tempfail"), state_dir=str(tmp_path / "s"))
        with pytest.raises(pop3lite.DeliveryError) as caught:
            save(server, command, delete=True)
        assert caught.value.reason == "tempfail" and caught.value.status == 75
        assert "exited with 75" in str(caught.value) and "mailbox locked" in str(caught.value)
        assert len(server.maildrops["alice"].messages) == 3
        assert [c for c in server.sessions[-1].commands if c.startswith("RETR")] != []
        assert not [c for c in server.sessions[-1].commands if c.startswith(("DELE", "QUIT"))]
        assert pop3lite._failure(caught.value)[0] == pop3lite._EXIT["TEMPORARY"]
        assert "try again later" in pop3lite._failure(caught.value)[1]


def test_mda_failure_stops_the_run_and_a_rerun_delivers_the_rest(tmp_path: Path) -> None:
    messages = make_messages(4, seed=32)
    state = str(tmp_path / "s")
    with server_with(messages) as server:
        failing = pop3lite.MDA(mda(tmp_path, "fail:Subject: message 2"), state_dir=state)
        with pytest.raises(pop3lite.DeliveryError) as caught:
            save(server, failing, delete=True)
        assert caught.value.reason == "failed" and caught.value.status == 1
        assert "no such folder" in str(caught.value)
        assert pop3lite._failure(caught.value)[0] == pop3lite._EXIT["LOCAL"]
        assert len(delivered(tmp_path)) == 2 and len(server.maildrops["alice"].messages) == 4
        report = save(server, pop3lite.MDA(mda(tmp_path), state_dir=state), delete=True)
        assert (report.saved, report.already, report.deleted) == (2, 2, 4)
        assert server.maildrops["alice"].messages == []
    assert sorted(m for _, m in delivered(tmp_path)) == sorted(as_stored(m) for m in messages)


def test_a_failed_mda_is_named_in_quotes(tmp_path: Path) -> None:
    with server_with(make_messages(1, seed=37)) as server:
        with pytest.raises(pop3lite.DeliveryError) as caught:
            save(server, pop3lite.MDA("exit 1", state_dir=str(tmp_path)))
    assert str(caught.value) == "the command 'exit 1' exited with 1"


@posix_only
def test_a_hanging_mda_is_killed_with_its_children_at_the_timeout(tmp_path: Path) -> None:
    with server_with(make_messages(2, seed=33)) as server:
        command = pop3lite.MDA(mda(tmp_path, "hang"), timeout=2.0, state_dir=str(tmp_path / "s"))
        started = time.monotonic()
        with pytest.raises(pop3lite.DeliveryError, match="did not finish within 2 s") as caught:
            save(server, command)
        assert time.monotonic() - started < 30 and caught.value.reason == "timeout"
        assert len(server.maildrops["alice"].messages) == 2
    child = int((tmp_path / "delivered" / "child.pid").read_text())

    def gone() -> bool:  # ended (a zombie until someone reaps it) or reaped
        try:
            return Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    if Path("/proc").is_dir():
        wait_until(gone)
    assert delivered(tmp_path) == []


def test_mda_delete_removes_an_earlier_runs_messages_by_their_journal_lines(
    tmp_path: Path,
) -> None:
    messages = make_messages(3, seed=34)
    state = str(tmp_path / "s")
    with server_with(messages) as server:
        assert save(server, pop3lite.MDA(mda(tmp_path), state_dir=state)).saved == 3
        server.maildrops["alice"].add(b"Subject: later\r\n\r\nx\r\n")
        report = save(server, pop3lite.MDA(mda(tmp_path), state_dir=state), delete=True)
        assert (report.saved, report.already, report.deleted) == (1, 3, 4)
        assert server.maildrops["alice"].messages == []
        again = save(server, pop3lite.MDA(mda(tmp_path), state_dir=state), new=False)
        assert again.saved == 0  # nothing left to fetch again
    assert len(delivered(tmp_path)) == 4


@pytest.mark.parametrize("template", ["%F", '"%F"'], ids=["bare", "double-quoted"])
def test_mda_sender_is_safe_for_the_shell_and_never_an_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    senders = [
        "a`touch${IFS}pwned`b@example.com",
        "a$(touch${IFS}pwned)b@example.com",
        "o'brien@example.com",
        '"a;touch${IFS}pwned;"@x.org',
        "-oQ/tmp/x@example.com",
        "bob.o+tag=x%y_z@ex-ample.org",
    ]
    messages = [b"Return-Path: <%s>\r\n\r\nx\r\n" % s.encode() for s in senders]
    argv = mda(tmp_path)
    shell = " ".join(f"'{part}'" for part in argv[:-1]) + " " + template
    with server_with(messages) as server:
        command = pop3lite.MDA(shell, state_dir=str(tmp_path / "s"))
        monkeypatch.chdir(tmp_path)  # where a `touch pwned` that ran would land
        assert save(server, command).saved == len(senders)
    expected = [b"MAILER-DAEMON"] * 5 + [senders[-1].encode()]
    assert [s for s, _ in delivered(tmp_path)] == expected
    assert not list(tmp_path.rglob("pwned"))


def test_mda_sender_in_quotes_runs_no_command(tmp_path: Path) -> None:
    # The reviewer's case: %F inside double quotes, a sender with backticks.
    out = tmp_path / "out"
    messages = [b"Return-Path: <`id`@x.org>\r\n\r\nx\r\n"]
    with server_with(messages) as server:
        command = pop3lite.MDA(f'cat >/dev/null; echo "%F" > {out}', state_dir=str(tmp_path))
        assert save(server, command).saved == 1
    assert out.read_text() == "MAILER-DAEMON\n"


def test_save_twice_saves_each_message_once_and_all_fetches_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 19 item 9, as a user types it: `save DIR`, then `save DIR --new`.
    target = tmp_path / "Mail"
    with server_with(make_messages(5, seed=35)) as server:
        argv = [f"{server.host}:{server.port}", "alice", "save", str(target)]
        assert pop3lite.main(argv) == 0
        assert "saved 5 messages" in capsys.readouterr().out
        for extra in ([], ["--new"]):
            assert pop3lite.main([*argv, *extra]) == 0
            out = capsys.readouterr().out
            assert "saved 0 messages" in out and "5 messages already saved before" in out
        assert len(maildir_contents(target)) == 5
        assert pop3lite.main([*argv, "--all"]) == 0
        assert "saved 5 messages" in capsys.readouterr().out
        assert len(maildir_contents(target)) == 10
        assert pop3lite.main([*argv, "--all", "--new"]) == 2
        assert "choose one" in capsys.readouterr().err


def mda_command_line(server: FakeServer, tmp_path: Path, behaviour: str, *extra: str) -> list[str]:
    shell = " ".join(f"'{part}'" for part in mda(tmp_path, behaviour)[:-1]) + " %F"
    return [f"{server.host}:{server.port}", "alice", "save", "--mda", shell, *extra]


@pytest.mark.parametrize(
    "behaviour, status, said",
    [
        ("ok", 0, "saved 3 messages"),
        ("tempfail", 5, "exited with 75 (EX_TEMPFAIL): mailbox locked; the command says: try "
         "again later"),
        ("fail:Subject: message 1", 1, "exited with 1: no such folder; the message stays"),
        ("hang", 1, "did not finish within 1 s; killed it"),
    ],
)  # fmt: skip
def test_save_mda_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], behaviour: str, status: int, said: str
) -> None:
    with server_with(make_messages(3, seed=36)) as server:
        argv = mda_command_line(server, tmp_path, behaviour, "--delete", "--timeout", "1")
        assert pop3lite.main(argv) == status
        out, err = capsys.readouterr()
        assert said in (out if status == 0 else err)
        assert len(server.maildrops["alice"].messages) == (0 if status == 0 else 3)
    assert len(delivered(tmp_path)) == {"ok": 3, "fail:Subject: message 1": 1}.get(behaviour, 0)
    state = Path(os.environ["HOME"]) / ".local" / "state" / "pop3lite"
    assert len(list(state.glob("mda-alice@localhost_*.journal"))) == 1


def test_save_mda_takes_no_destination(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["127.0.0.1:1", "alice", "save", "Mail", "--mda", "procmail"]
    assert pop3lite.main(argv) == 2
    assert "save --mda CMD takes no DIR or FILE.mbox: 'Mail'" in capsys.readouterr().err


@posix_only
def test_a_killed_mda_save_loses_nothing_and_delivers_at_most_the_one_in_flight_again(
    tmp_path: Path,
) -> None:
    messages = make_messages(25, seed=37)
    with server_with(messages, faults=[Fault("delay", "RETR", 0.03)]) as server:
        argv = mda_command_line(server, tmp_path, "ok", "--delete")
        argv = [sys.executable, str(HERE / "pop3lite.py"), *argv]
        statuses, last = kill_and_rerun(argv, signal.SIGKILL, seed=4242, kills=6)
        assert last.returncode == 0, last.stderr
        assert server.maildrops["alice"].messages == []
    killed = statuses.count(-signal.SIGKILL)
    assert killed >= 3
    got = [message for _, message in delivered(tmp_path)]
    assert set(got) == {as_stored(m) for m in messages}  # nothing lost
    assert len(got) <= len(messages) + killed  # at most the one in flight, per kill


# Issue 19 item 17: Courier replaces a message with 8-bit headers by a "Cannot display Unicode
# content" wrapper for a client that did not send UTF8 (RFC 6856 section 2.1); save and retr
# send UTF8 when it is offered, so the message is kept as it is.
EIGHT_BIT = (
    "From: Jörg Müller <joerg@example.org>\r\nTo: alice@example.org\r\n"
    "Subject: Grüße aus Köln, 日本語の件名\r\nMessage-ID: <u8@example.org>\r\n\r\nHallo!\r\n"
).encode()


def test_save_and_retr_keep_a_message_whose_server_down_converts_without_utf8(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    with server_with([EIGHT_BIT], utf8_downconvert=True) as server:
        assert save(server, tmp_path / "Mail").saved == 1
        address = f"{server.host}:{server.port}"
        status = pop3lite.main([address, "alice", "save", str(tmp_path / "cli.mbox"), "-q"])
        assert status == 0
        assert pop3lite.main([address, "alice", "retr", "1"]) == 0
        for log in server.sessions:
            assert log.commands[:2] == ["CAPA", "UTF8"]
        with pop3lite.POP3(server.host, server.port, timeout=10, utf8=False) as pop:
            pop.login("alice", PASSWORD)
            wrapper = pop.retr(1)  # what a client that keeps to ASCII gets: not the message
    assert maildir_contents(tmp_path / "Mail") == [as_stored(EIGHT_BIT)]
    assert as_stored(EIGHT_BIT) in (tmp_path / "cli.mbox").read_bytes()
    assert capsysbinary.readouterr().out == EIGHT_BIT
    assert b"Cannot display Unicode content" in wrapper and EIGHT_BIT in wrapper


# -- helpers ---------------------------------------------------------------------------------


def client(server: FakeServer) -> pop3lite.POP3:
    server.wait_idle()  # a session that ended without QUIT (a failed save) lets go first
    pop = pop3lite.POP3(server.host, server.port, timeout=10)
    pop.login("alice", PASSWORD)
    return pop


def save(
    server: FakeServer, target: Path | pop3lite.Destination, **options: Any
) -> pop3lite.SaveReport:
    with client(server) as pop:
        dest = target if isinstance(target, pop3lite.Destination) else str(target)
        return pop3lite.save(pop, dest, **options)
