#!/usr/bin/env python3
"""Benchmark ``pop3lite.py save DEST --new --delete`` against mpop on a real Dovecot (issue 12).

    sudo python3 bench/bench_save.py              # 500 messages, 5 rounds, 0 and 20 ms RTT
    sudo python3 bench/bench_save.py --rounds 3 --messages 200

A developer tool, not run by CI. Needs root (Dovecot drops privileges to serve the mailbox as
nobody) and dovecot installed; mpop is optional (absent: a message, and its column is skipped).
Everything stays on 127.0.0.1: a private Dovecot instance (own config, state and log in a
temporary directory, plaintext POP3 on a free port, as tools/interop.sh sets one up) serves a
Maildir of small messages (1-4 KiB). Before every run the mailbox is refilled from a template
and the destination is a fresh Maildir, so both clients do the same job: fetch every message
into a Maildir, delete it on the server, QUIT.

The 20 ms round trip comes from a delaying TCP proxy in this process (threads, loopback): every
chunk is passed on no earlier than 10 ms after it arrived, in each direction, without a
bandwidth limit; a pipelined batch therefore costs about one round trip, as on a real network.
(netem would be the obvious tool, but the sch_netem qdisc is often missing in containers.)
Times are wall-clock medians of the rounds, clients interleaved; each run is checked: every
message saved once, the server empty.
"""

# SPDX-License-Identifier: MIT
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
USER = "bench"
PASSWORD = "bench-Pa55"
NOBODY = 65534


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {seconds:g}s")


def write_template(path: str, count: int) -> None:
    rng = random.Random(12)
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(path, sub))
    now = int(time.time())
    for index in range(count):
        body = "".join(
            f"line {n} of message {index}: {'x' * 60}\n" for n in range(rng.randint(12, 50))
        )
        data = (
            f"From: Sender {index} <sender{index}@example.org>\nTo: {USER}@example.org\n"
            f"Date: Wed, 26 Nov 2025 10:00:00 +0000\nMessage-ID: <{index}@bench.example>\n"
            f"Subject: message {index}\n\n{body}"
        ).encode()
        with open(os.path.join(path, "new", f"{now + index}.M{index}P1.bench"), "wb") as file:
            file.write(data)


class Dovecot:
    """A private Dovecot instance serving USER's Maildir over plaintext POP3 on 127.0.0.1."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.home = os.path.join(work, "home")
        self.port = free_port()
        os.makedirs(os.path.join(work, "run"))
        os.makedirs(os.path.join(work, "state"))
        os.makedirs(self.home)
        passwd = os.path.join(work, "passwd")
        with open(passwd, "w") as file:
            file.write(f"{USER}:{{PLAIN}}{PASSWORD}::::{self.home}::\n")
        os.chmod(passwd, 0o644)
        config = os.path.join(work, "dovecot.conf")
        with open(config, "w") as file:
            file.write(
                f"""protocols = pop3
listen = 127.0.0.1
base_dir = {work}/run
state_dir = {work}/state
instance_name = pop3lite-bench-{os.getpid()}
log_path = {work}/dovecot.log
default_internal_user = dovecot
default_login_user = dovenull
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
  default_fields = uid={NOBODY} gid={NOBODY} mail=maildir:~/Maildir
}}
pop3_uidl_format = %08Xu%08Xv
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
}}
"""
            )
        self.process = subprocess.Popen(
            ["dovecot", "-F", "-c", config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def refill(self, template: str) -> None:
        maildir = os.path.join(self.home, "Maildir")
        shutil.rmtree(maildir, ignore_errors=True)
        shutil.copytree(template, maildir)
        for root, dirs, files in os.walk(self.home):
            for name in dirs + files:
                os.chown(os.path.join(root, name), NOBODY, NOBODY)
        os.chown(self.home, NOBODY, NOBODY)
        # The copy's writeback would otherwise land in the middle of the next client's run
        # (file creation waits for the file system's journal): flush it first.
        os.sync()

    def left(self) -> int:
        maildir = os.path.join(self.home, "Maildir")
        return sum(len(os.listdir(os.path.join(maildir, sub))) for sub in ("new", "cur"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(20)


class DelayProxy:
    """127.0.0.1:port -> target, each chunk passed on ``delay`` seconds after it arrived."""

    def __init__(self, target: int, delay: float) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.5)
        self.port = int(self.listener.getsockname()[1])
        self.stopping = False
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target), 10)
            for sock in (client, server):
                sock.settimeout(120)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pipe(client, server)
            self.pipe(server, client)

    def pipe(self, source: socket.socket, sink: socket.socket) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            try:
                while True:
                    data = source.recv(262144)
                    with ready:
                        queue.append((time.monotonic() + self.delay, data))
                        ready.notify()
                    if not data:
                        return
            except OSError:
                with ready:
                    queue.append((0.0, b""))
                    ready.notify()

        def write() -> None:
            try:
                while True:
                    with ready:
                        while not queue:
                            ready.wait()
                        due, data = queue.popleft()
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
            except OSError:
                pass

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.stopping = True
        self.listener.close()
        self.thread.join(5)


def run_pop3lite(port: int, dest: str, script: bool = True) -> None:
    """``python3 pop3lite.py`` compiles its 5000 lines at every start (a script's bytecode is
    never cached); ``python3 -m pop3lite`` (what the installed ``pop3lite`` command does too)
    loads the cached bytecode."""
    env = dict(os.environ, POP3_PASSWORD=PASSWORD, PYTHONPATH=REPO)
    start = [os.path.join(REPO, "pop3lite.py")] if script else ["-m", "pop3lite"]
    argv = [sys.executable, *start, f"127.0.0.1:{port}", USER]
    argv += ["save", dest, "--new", "--delete", "-q"]
    subprocess.run(argv, env=env, check=True, timeout=600)


def run_pop3lite_module(port: int, dest: str) -> None:
    run_pop3lite(port, dest, script=False)


def run_mpop(port: int, dest: str) -> None:
    os.makedirs(dest)
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(dest, sub))
    config = os.path.join(os.path.dirname(dest), "mpoprc")
    with open(config, "w") as file:
        file.write(
            f"account default\nhost 127.0.0.1\nport {port}\nuser {USER}\npassword {PASSWORD}\n"
            f"tls off\nauth plain\ndelivery maildir {dest}\nkeep off\nonly_new on\n"
            f"uidls_file {dest}.uidls\n"
        )
    os.chmod(config, 0o600)
    subprocess.run(["mpop", "-C", config, "-q"], check=True, timeout=600)


def saved(dest: str) -> int:
    return sum(len(os.listdir(os.path.join(dest, sub))) for sub in ("new", "cur"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_save: run as root (Dovecot serves the mailbox as nobody)", file=sys.stderr)
        return 2
    if shutil.which("dovecot") is None:
        print("bench_save: dovecot is not installed (Debian: dovecot-pop3d)", file=sys.stderr)
        return 2
    clients: dict[str, Callable[[int, str], None]] = {
        "pop3lite.py": run_pop3lite,
        "-m pop3lite": run_pop3lite_module,
    }
    subprocess.run([sys.executable, "-c", "import pop3lite"], env=dict(PYTHONPATH=REPO), check=True)
    if shutil.which("mpop") is None:
        print("bench_save: mpop is not installed (Debian: mpop); its column is skipped")
    else:
        clients["mpop"] = run_mpop
    work = tempfile.mkdtemp(prefix="pop3lite-bench-save.")
    os.chmod(work, 0o755)
    template = os.path.join(work, "template")
    write_template(template, args.messages)
    dovecot = Dovecot(os.path.join(work, "dovecot"))
    results: dict[tuple[str, int], float] = {}
    try:
        for rtt in (0, 20):
            proxy = DelayProxy(dovecot.port, rtt / 2000) if rtt else None
            port = proxy.port if proxy else dovecot.port
            times: dict[str, list[float]] = {name: [] for name in clients}
            for round_number in range(args.rounds):
                for name, run in clients.items():
                    dovecot.refill(template)
                    dest = os.path.join(work, f"dest-{name}-{rtt}-{round_number}")
                    started = time.perf_counter()
                    run(port, dest)
                    times[name].append(time.perf_counter() - started)
                    if saved(dest) != args.messages or dovecot.left():
                        raise SystemExit(
                            f"{name}: saved {saved(dest)} of {args.messages}, "
                            f"{dovecot.left()} left on the server"
                        )
                    shutil.rmtree(dest)
            for name in clients:
                results[(name, rtt)] = statistics.median(times[name])
            if proxy:
                proxy.close()
    finally:
        dovecot.stop()
        shutil.rmtree(work, ignore_errors=True)
    version = subprocess.run(["dovecot", "--version"], capture_output=True, text=True)
    print(
        f"save {args.messages} messages into a Maildir and delete them, Dovecot "
        f"{version.stdout.split()[0]}, median of {args.rounds} rounds, "
        f"{sys.implementation.name} {sys.version.split()[0]}"
    )
    print(f"{'RTT':>6} {'pop3lite.py':>12} {'-m pop3lite':>12} {'mpop':>8}  ratios to mpop")
    for rtt in (0, 20):
        script, module = results[("pop3lite.py", rtt)], results[("-m pop3lite", rtt)]
        theirs = results.get(("mpop", rtt))
        mpop = f"{theirs:7.3f}s" if theirs else f"{'-':>8}"
        ratios = f"{script / theirs:.2f}x, {module / theirs:.2f}x" if theirs else "-"
        print(f"{rtt:>4}ms {script:11.3f}s {module:11.3f}s {mpop}  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
