"""Shared fixtures for the contree-cli 0.9.4 / contree-sdk 0.3.6 end-to-end tests.

These tests drive the published Python clients against a real, running Boxwood
server. `scripts/conformance.sh clients` starts one (with docker.io mirrored to a
loopback registry holding library/busybox:latest) and runs pytest with:

  BOXWOOD_URL    base URL of the server (e.g. http://127.0.0.1:PORT)
  BOXWOOD_TOKEN  a token with every permission

The server must have the public image `busybox:latest` (tag) seeded.

CLI isolation: every `contree` invocation gets its own CONTREE_HOME (config,
session DB, file cache), HOME and XDG_CONFIG_HOME under a per-session temporary
directory, no inherited CONTREE_* variables, the PyPI update check disabled, and
an explicit CONTREE_SESSION so session state never leaks between tests.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Generous: one VM run takes ~2 s here, but the machine is shared and TCG is slow.
CLI_TIMEOUT = 300
BUSYBOX_TAG = "busybox:latest"
CONTREE_BIN = Path(sys.executable).with_name("contree")


@dataclass(frozen=True)
class Server:
    url: str
    token: str


@pytest.fixture(scope="session")
def server() -> Server:
    url = os.environ.get("BOXWOOD_URL", "").rstrip("/")
    token = os.environ.get("BOXWOOD_TOKEN", "")
    if not url or not token:
        pytest.fail(
            "BOXWOOD_URL and BOXWOOD_TOKEN must point at a running Boxwood server "
            "(run these tests through `scripts/conformance.sh clients`)",
            pytrace=False,
        )
    return Server(url=url, token=token)


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    def json_lines(self) -> list[dict]:
        """Parse `-o json` output: one JSON object per line."""
        rows = []
        for line in self.out.splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise AssertionError(f"non-JSON line {line!r} in output of\n{self}") from exc
        return rows

    def json(self) -> dict:
        rows = self.json_lines()
        assert len(rows) == 1, f"expected exactly one JSON object, got {len(rows)}\n{self}"
        return rows[0]

    def __str__(self) -> str:
        stdout = self.out if len(self.stdout) < 4000 else self.out[:4000] + "...<truncated>"
        return (
            f"$ contree {shlex.join(self.args)}\n"
            f"exit code: {self.returncode}\n"
            f"--- stdout ---\n{stdout}\n"
            f"--- stderr ---\n{self.err}"
        )


def cli_env(home: Path, session: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONTREE_", "NEBIUS_")) and k not in ("XDG_CONFIG_HOME",)
    }
    env.update(
        CONTREE_HOME=str(home / "contree"),
        XDG_CONFIG_HOME=str(home / "xdg"),
        HOME=str(home),
        CONTREE_NO_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        # The venv's bin first, so a `#!/usr/bin/env -S contree ...` shebang resolves.
        PATH=f"{CONTREE_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if session is not None:
        env["CONTREE_SESSION"] = session
    return env


@dataclass
class Cli:
    """Runs the real `contree` executable with an isolated home and session."""

    home: Path
    session: str | None = None
    cwd: Path | None = None
    history: list[CliResult] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return cli_env(self.home, self.session)

    def __call__(
        self,
        *args: str,
        input: bytes | str | None = None,
        expect: int | None = 0,
        timeout: float = CLI_TIMEOUT,
    ) -> CliResult:
        """Run `contree ARGS...`; assert the exit code equals `expect` (None: don't check).

        stdin is /dev/null unless `input` is given (then it is a pipe that is closed
        after `input` is written), so the CLI never waits on the test's own stdin.
        """
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run(
            [str(CONTREE_BIN), *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            env=self.env,
            cwd=self.cwd or self.home,
            timeout=timeout,
        )
        result = CliResult(list(args), proc.returncode, proc.stdout, proc.stderr)
        self.history.append(result)
        if expect is not None:
            assert result.returncode == expect, f"unexpected exit code (wanted {expect})\n{result}"
        return result

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        """Start `contree ARGS...` with SIGINT deliverable, as from a terminal.

        A process started in the background by a non-interactive shell (CI runners,
        `nohup ... &`) inherits SIGINT ignored, and so would the CLI: Python installs its
        KeyboardInterrupt handler only when SIGINT is not ignored at start-up. A handler in
        this process during the fork is reset to the default by exec.
        """
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return subprocess.Popen(
                [str(CONTREE_BIN), *args],
                env=self.env,
                cwd=self.cwd or self.home,
                **kwargs,
            )
        finally:
            signal.signal(signal.SIGINT, previous)

    def with_session(self, session: str) -> Cli:
        return Cli(home=self.home, session=session, cwd=self.cwd)


@pytest.fixture(scope="session")
def cli_home(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home directory whose `default` profile was saved by `contree auth`."""
    assert CONTREE_BIN.is_file(), f"contree-cli is not installed next to {sys.executable}"
    home = tmp_path_factory.mktemp("cli-home")
    cli = Cli(home=home)
    cli("auth", "--type", "jwt", "--url", server.url, "--token", server.token)
    return home


@pytest.fixture
def cli_bare(cli_home: Path, request: pytest.FixtureRequest) -> Cli:
    """Authenticated CLI with a fresh, empty session (no image selected yet)."""
    return Cli(home=cli_home, session=f"pytest-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def cli(cli_bare: Cli) -> Cli:
    """Authenticated CLI whose session image is `tag:busybox:latest`."""
    cli_bare("use", f"tag:{BUSYBOX_TAG}")
    return cli_bare


@pytest.fixture(scope="session")
def busybox_uuid(cli_home: Path) -> str:
    """UUID of the seeded busybox:latest image, as listed by `contree images`."""
    listing = Cli(home=cli_home, session="pytest-images")("-o", "json", "images")
    rows = listing.json_lines()
    matches = [row for row in rows if row.get("tag") == BUSYBOX_TAG]
    assert len(matches) == 1, f"expected one image tagged {BUSYBOX_TAG}\n{listing}"
    image_uuid = matches[0]["uuid"]
    uuid.UUID(image_uuid)
    return image_uuid
