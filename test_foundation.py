"""Foundation tests (issues 2 and 7): pop3lite on a minimal Python, and the benchmark still runs."""

# SPDX-License-Identifier: MIT
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import fakeserver

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs in a fresh interpreter where `ssl` and `email` (and their C parts) cannot be imported, as on
# minimal Pythons built without OpenSSL or trimmed of the email package. The fake server imports
# both, so it runs in the test process and only the client runs in the child.
BLOCKED_CHILD = textwrap.dedent(
    """
    import sys

    BLOCKED = {"ssl", "_ssl", "email"}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError("No module named %r (blocked by the test)" % name)
            return None

    sys.meta_path.insert(0, Blocker())
    assert not BLOCKED & set(sys.modules), sorted(BLOCKED & set(sys.modules))
    try:
        import ssl  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("the import blocker does not work")

    sys.path.insert(0, sys.argv[1])
    import pop3lite

    with pop3lite.POP3(sys.argv[2], int(sys.argv[3]), tls="none", timeout=10.0) as pop:
        pop.login("hogehoge", "fugafuga")
        stat = pop.stat()
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print("stat=%d,%d loaded=%s" % (stat[0], stat[1], ",".join(loaded) or "none"))
    """
)


def test_plaintext_session_without_ssl_and_email() -> None:
    with fakeserver.FakeServer() as server:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", BLOCKED_CHILD, HERE, server.host, str(server.port)],
            capture_output=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert proc.stdout.decode().split() == ["stat=2,10180", "loaded=none"]
    (transcript,) = server.transcripts
    commands = [line for line in transcript if line.startswith("C: ")]
    assert commands[:2] == ["C: CAPA", "C: USER hogehoge"]  # CAPA: may USER and PASS pipeline?
    assert commands[-2:] == ["C: STAT", "C: QUIT"]


def test_benchmark_self_check_runs() -> None:
    # Tiny sizes, one round: checks that the benchmark's server and every client (poplib, the
    # plain reader, pop3lite) still work and return the right bytes. No timing is asserted.
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "bench", "bench.py"), "--self-check"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
        cwd=HERE,
    )
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, output
    assert "self-check: ok" in output, output


def python_blocks(markdown: str) -> list[str]:
    """The ```python code blocks of a Markdown text."""
    blocks, current = [], None
    for line in markdown.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_library_tour_runs_as_written(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first example, run against the fake server holding the seed's mail."""
    import pop3lite

    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        tour = python_blocks(f.read())[0]
    assert 'pop3lite.POP3("pop.example.com")' in tour
    users = {"alice": fakeserver.Maildrop("secret", fakeserver.OPERAMAIL_MESSAGES)}
    saved: dict[int, bytes] = {}
    with fakeserver.FakeServer(users=users) as server:
        real = pop3lite.POP3
        monkeypatch.setattr(
            pop3lite,
            "POP3",
            lambda host, *args, **kwargs: real(server.host, server.port, tls="none", timeout=10),
        )
        monkeypatch.chdir(tmp_path)
        exec(tour, {"password": "secret", "save": saved.__setitem__})
        assert users["alice"].messages == []  # every message deleted, by the clean exit's QUIT
    printed = capsys.readouterr().out
    assert printed.strip() == "\u300c\uff23\uff33\uff23\u304b\u3089\u306e\u8033\u3088\u308a" \
        "\u306a\u304a\u77e5\u3089\u305b\u300d<\u51fa\u4f1a\u3044\u7de8>"
    assert saved == dict(enumerate(fakeserver.OPERAMAIL_MESSAGES, 1))
    with open("big.eml", "rb") as f:
        assert f.read() == fakeserver.OPERAMAIL_MESSAGES[0]


def module_level_bindings(path: str) -> dict[str, list[int]]:
    """Every name bound at a module's top level (including inside top-level if/try blocks),
    with the lines that bind it."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    bound: dict[str, list[int]] = {}

    def targets(node: ast.AST) -> list[str]:
        return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]

    def visit(statements: list[ast.stmt], type_checking: bool) -> None:
        for node in statements:
            names: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [name for target in node.targets for name in targets(target)]
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                names = targets(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not type_checking:
                # `import http.client` and `import http.server` both bind `http`, to the same
                # package: each counts under its dotted name, so only a real rebinding shows.
                names = [alias.asname or alias.name for alias in node.names]
            elif isinstance(node, ast.If):
                # `if TYPE_CHECKING:` imports exist only for the type checker
                checking = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                visit(node.body, type_checking or checking)
                visit(node.orelse, type_checking)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    visit(block, type_checking)
                for handler in node.handlers:
                    visit(handler.body, type_checking)
            for name in names:
                bound.setdefault(name, []).append(node.lineno)

    visit(tree.body, False)
    return bound


@pytest.mark.parametrize("module", ["pop3lite.py", "fakeserver.py"])
def test_every_module_level_name_is_bound_once(module: str) -> None:
    bindings = module_level_bindings(os.path.join(HERE, module))
    assert "main" in bindings and len(bindings) > 50  # the walk sees the module's names
    twice = {name: lines for name, lines in bindings.items() if len(lines) > 1}
    assert twice == {}, f"bound more than once in {module}: {twice}"



@pytest.mark.parametrize("module", ["pop3lite.py", "fakeserver.py"])
def test_no_function_is_longer_than_60_lines(module: str) -> None:
    """People read these files before they trust them: no function is too long to see whole,
    and fakeserver.py, split by concern, has no class over 400 lines."""
    import ast

    with open(os.path.join(HERE, module), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    too_long = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = 60
        elif isinstance(node, ast.ClassDef) and module == "fakeserver.py":
            limit = 400
        else:
            continue
        # Python 3.7's ast has no end_lineno: there, the last line any node of the body starts on.
        end = getattr(node, "end_lineno", None) or max(
            getattr(child, "lineno", 0) for child in ast.walk(node)
        )
        lines = end - node.lineno + 1
        if lines > limit:
            too_long[f"{node.name} (line {node.lineno})"] = lines
    assert too_long == {}
