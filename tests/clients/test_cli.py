"""contree-cli 0.9.4 end to end against a live Boxwood server.

Covers: `auth` (verified profile save, bad-token rejection), `images`, `use`
(tag:busybox:latest, unknown tag), `run` (shell mode with stdout/stderr/exit code;
exec mode with args, -e and -C; non-disposable runs advancing the session image;
piped stdin, small text and a 1 MiB binary stream forwarded after spawn; `-I`
interpreter mode from a pipe and through a `#!/usr/bin/env -S contree run -I`
shebang), Ctrl-C (SIGINT to the CLI -> SIGINT to spid 1, remote trap runs, CLI
exits with the remote exit code), the no-VM inspect commands `ls`, `cat`, `grep`
and `export` (gzip pass-through piped into `tar -tzf -`, and plain tar with -F),
and `build` of a Dockerfile using FROM (auto-import through the docker.io mirror),
RUN, WORKDIR, ENV, COPY and --tag.
"""

from __future__ import annotations

import configparser
import gzip
import hashlib
import io
import queue
import random
import re
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

from conftest import BUSYBOX_TAG, CLI_TIMEOUT, CONTREE_BIN, Cli, Server

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --- auth / images / use -------------------------------------------------------------------


def test_auth_saves_verified_profile(cli_home: Path, server: Server) -> None:
    ini = configparser.ConfigParser()
    assert ini.read(cli_home / "contree" / "auth.ini"), "contree auth wrote no auth.ini"
    profile = ini["profile:default"]
    assert profile["url"] == server.url
    assert profile["token"] == server.token
    assert profile["type"] == "jwt"
    assert ini["DEFAULT"]["profile"] == "default"

    # `auth ls` probes GET /whoami for every profile and reports the result.
    listing = Cli(home=cli_home)("auth", "ls")
    rows = [line.split() for line in listing.out.splitlines()]
    default = [row for row in rows if row and row[0] == "default"]
    assert default and default[0][-1] == "ok", f"profile not reported ok\n{listing}"


def test_auth_rejects_bad_token(server: Server, tmp_path: Path) -> None:
    cli = Cli(home=tmp_path)
    bad = cli("auth", "--type", "jwt", "--url", server.url, "--token", "not-a-valid-token", expect=1)
    assert "Token verification failed" in bad.err, str(bad)
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "contree" / "auth.ini")
    assert not ini.has_section("profile:default"), "a rejected token was saved"
    # Without a profile, remote commands refuse to run.
    no_profile = cli("images", expect=1)
    assert "does not exist" in no_profile.err, str(no_profile)


def test_images_lists_seeded_busybox(cli: Cli, busybox_uuid: str) -> None:
    listing = cli("images")
    assert BUSYBOX_TAG in listing.out and busybox_uuid in listing.out, str(listing)


def test_use_tag_sets_session_image(cli_bare: Cli, busybox_uuid: str) -> None:
    empty = cli_bare("use", expect=1)
    assert "No active session" in empty.err, str(empty)

    used = cli_bare("use", f"tag:{BUSYBOX_TAG}")
    assert used.out.strip() == f"export CONTREE_SESSION={cli_bare.session}", str(used)

    state = cli_bare("-o", "json", "use").json()
    assert state["session_key"] == cli_bare.session
    assert state["current_image"] == busybox_uuid, state
    assert state["last_title"] == f"tag:{BUSYBOX_TAG}", state

    # An unknown tag is rejected (GET /inspect/?tag= -> 404) and the session is unchanged.
    missing = cli_bare("use", "tag:no-such-image:pytest", expect=1)
    assert "not found" in missing.err.lower() or "404" in missing.err, str(missing)
    assert cli_bare("-o", "json", "use").json()["current_image"] == busybox_uuid


# --- run -----------------------------------------------------------------------------------


def test_run_shell_stdout_stderr_exit_code(cli: Cli) -> None:
    res = cli("run", "-s", "-D", "--", "echo hello-stdout; echo hello-stderr >&2; exit 3", expect=3)
    assert res.out == "hello-stdout\n", str(res)
    assert "hello-stderr\n" in res.err, str(res)


def test_run_exec_args_env_cwd_json(cli: Cli) -> None:
    res = cli(
        "-o", "json", "run", "-D", "-e", "FOO=bar baz", "-C", "/tmp",
        "--", "sh", "-c", 'echo "$1|$FOO|$(pwd)"', "sh", "two  spaces",
    )  # fmt: skip
    op = res.json()
    assert op["status"] == "SUCCESS", str(res)
    assert op["exit_code"] == 0, str(res)
    assert op["stdout"] == "two  spaces|bar baz|/tmp\n", str(res)
    assert op["result_image_uuid"] is None, f"disposable run produced an image\n{res}"


def test_run_non_disposable_advances_session_image(cli: Cli, busybox_uuid: str) -> None:
    res = cli("-o", "json", "run", "-s", "--", "echo persisted > /cli-persist.txt && echo done")
    op = res.json()
    assert op["status"] == "SUCCESS" and op["stdout"] == "done\n", str(res)
    new_image = op["result_image_uuid"]
    assert new_image and UUID_RE.fullmatch(new_image), f"no result image\n{res}"
    assert new_image != busybox_uuid

    state = cli("-o", "json", "use").json()
    assert state["current_image"] == new_image, f"session did not move to the run's image: {state}"
    assert cli("cat", "/cli-persist.txt").out == "persisted\n"
    assert re.search(r" cli-persist\.txt$", cli("ls", "/").out, re.M)


def test_run_piped_stdin_text(cli: Cli) -> None:
    data = "line one\nline two\n\ttabbed line\n"
    res = cli("run", "-D", "--", "cat", input=data)
    assert res.out == data, str(res)


def test_run_piped_stdin_large_binary(cli: Cli) -> None:
    # 1 MiB of binary data: larger than the CLI's 512 KiB stdin chunk, so part of it
    # rides in the spawn request and the rest goes through POST .../subprocesses/1/stdin.
    data = random.Random(1234).randbytes(1 << 20)
    res = cli("run", "-D", "-s", "--", "sha256sum; echo end", input=data)
    lines = res.out.split("\n")
    assert lines[0].split()[0] == hashlib.sha256(data).hexdigest(), f"stdin corrupted in transit\n{res}"
    assert lines[1] == "end", str(res)


def test_run_interpreter_script_from_pipe(cli: Cli) -> None:
    # `-I FILE` strips the #! line and feeds the rest to `/bin/sh -s` as stdin; here the
    # script file is the CLI's own piped stdin.
    script = (
        "#!/usr/bin/env -S contree run -I -D\n"
        "echo from-script\n"
        "for i in 1 2; do echo \"loop $i\"; done\n"
        "exit 4\n"
    )
    res = cli("run", "-I", "-D", "/dev/stdin", input=script, expect=4)
    assert res.out == "from-script\nloop 1\nloop 2\n", str(res)


def test_run_interpreter_shebang_script(cli: Cli, tmp_path: Path) -> None:
    script = tmp_path / "probe.contree.sh"
    script.write_text(
        "#!/usr/bin/env -S contree run -I -D -t 60\n"
        "echo \"shebang-ok host=$(hostname)\"\n"
        "grep -c root /etc/passwd\n"
    )
    script.chmod(0o755)
    proc = subprocess.run(
        [str(script)], stdin=subprocess.DEVNULL, capture_output=True,
        env=cli.env, cwd=tmp_path, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout.decode()}\nstderr:\n{proc.stderr.decode()}"
    assert proc.returncode == 0, detail
    # The CLI's default hostname is linuxkit.
    assert proc.stdout.decode() == "shebang-ok host=linuxkit\n1\n", detail


def sigint_ignored(pid: int) -> bool:
    """Whether SIGINT is ignored by process `pid` (its `SigIgn` mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def test_ctrl_c_sends_sigint_to_main_process(cli: Cli) -> None:
    remote = (
        'trap "echo got-int; kill \\$pid 2>/dev/null; exit 7" INT; '
        "sleep 120 >/dev/null 2>&1 & pid=$!; "
        "echo ready; wait $pid; echo not-interrupted"
    )
    proc = cli.popen(
        "run", "-s", "-D", "-t", "180", "--", remote,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: queue.Queue[bytes] = queue.Queue()
    stderr_chunks: list[bytes] = []

    def pump_stdout() -> None:
        for line in iter(proc.stdout.readline, b""):
            lines.put(line)
        lines.put(b"")

    def pump_stderr() -> None:
        stderr_chunks.append(proc.stderr.read())

    threads = [threading.Thread(target=f, daemon=True) for f in (pump_stdout, pump_stderr)]
    for t in threads:
        t.start()
    stdout: list[bytes] = []

    def fail(msg: str) -> str:
        return f"{msg}\nstdout: {b''.join(stdout)!r}\nstderr: {b''.join(stderr_chunks).decode()}"

    try:
        try:
            first = lines.get(timeout=180)
        except queue.Empty:
            raise AssertionError(fail("remote command never printed 'ready'")) from None
        stdout.append(first)
        assert first == b"ready\n", fail("unexpected first line")
        # A CLI that ignores SIGINT (inherited from a background launch) could never pass.
        assert not sigint_ignored(proc.pid), fail("the CLI process ignores SIGINT")

        proc.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        try:
            returncode = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(fail("CLI did not exit within 60 s of Ctrl-C")) from None
        elapsed = time.monotonic() - interrupted_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(timeout=10)
    while (line := lines.get(timeout=5)) != b"":
        stdout.append(line)

    out = b"".join(stdout).decode()
    err = b"".join(stderr_chunks).decode()
    assert out == "ready\ngot-int\n", fail("remote trap did not run (or the process was not signalled)")
    assert returncode == 7, fail(f"CLI exit code {returncode}, expected the remote exit code 7")
    assert elapsed < 30, fail(f"CLI took {elapsed:.1f}s to exit after SIGINT")
    sent = re.search(r"Sent SIGINT to operation (" + UUID_RE.pattern + ")", err)
    assert sent, fail("CLI did not report signalling the operation")

    # The server's view of the operation agrees: it ran to completion with the trap's code.
    shown = cli("-o", "json", "show", sent.group(1)).json()
    assert shown["status"] == "SUCCESS", shown
    assert shown["exit_code"] == 7, shown
    assert shown["result"]["stdout"] == "ready\ngot-int\n", shown


# --- inspect: ls / cat / grep / export ---------------------------------------------------


def test_ls(cli: Cli) -> None:
    root = cli("ls", "/")
    names = {line.split()[-1] for line in root.out.splitlines() if not line.startswith("total")}
    assert {"bin", "etc", "tmp"} <= names, str(root)
    assert re.search(r"^d[rwx-]{9} .* etc$", root.out, re.M), f"etc is not listed as a directory\n{root}"

    etc = cli("-o", "json", "ls", "/etc").json_lines()
    by_name = {row["path"]: row for row in etc}
    assert "passwd" in by_name, etc
    assert by_name["passwd"]["is_regular"] and not by_name["passwd"]["is_dir"], by_name["passwd"]
    assert by_name["passwd"]["size"] > 0

    missing = cli("ls", "/no/such/dir", expect=None)
    assert missing.returncode != 0, str(missing)


def test_cat(cli: Cli) -> None:
    passwd = cli("cat", "/etc/passwd")
    assert passwd.out.startswith("root:x:0:0:"), str(passwd)
    # /bin/sh is a symlink to busybox in the image: download follows it.
    sh = cli("cat", "/bin/sh")
    assert sh.stdout[:4] == b"\x7fELF", f"/bin/sh is not an ELF binary: {sh.stdout[:16]!r}\n{sh.err}"
    missing = cli("cat", "/no/such/file", expect=None)
    assert missing.returncode != 0 and not missing.stdout, str(missing)


def test_grep(cli: Cli) -> None:
    hit = cli("grep", "^root:", "/etc")
    assert re.search(r"^/etc/passwd:1:root:x:0:0:", hit.out, re.M), str(hit)

    raw = cli("grep", "--raw", "root", "/etc/passwd").json()
    assert raw["path"] == "/etc/passwd" and raw["truncated"] is False, raw
    match = raw["matches"][0]
    assert match["line_number"] == 1 and match["type"] == "match", raw
    assert {"text": "root", "start": 0, "end": 4} in match["submatches"], raw

    none = cli("grep", "zz-no-such-text-zz", "/etc", expect=1)
    assert none.out == "", str(none)


def test_export_gzip_stream_into_tar(cli: Cli, tmp_path: Path) -> None:
    # The literal pipeline: the CLI passes the server's gzip stream through untouched.
    pipeline = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"'{CONTREE_BIN}' export /etc | tar -tzf -"],
        stdin=subprocess.DEVNULL, capture_output=True, env=cli.env, cwd=tmp_path, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    detail = f"exit {pipeline.returncode}\nstdout:\n{pipeline.stdout.decode()}\nstderr:\n{pipeline.stderr.decode()}"
    assert pipeline.returncode == 0, detail
    members = {m.rstrip("/") for m in pipeline.stdout.decode().split()}
    assert {"etc", "etc/passwd", "etc/group"} <= members, detail

    # Content survives: etc/passwd in the archive equals `contree cat /etc/passwd`.
    raw = cli("export", "/etc").stdout
    assert raw[:2] == b"\x1f\x8b", f"export did not produce gzip (first bytes {raw[:8]!r})"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw)), mode="r:") as tar:
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        assert passwd.read() == cli("cat", "/etc/passwd").stdout

    # `-F x.tar` asks for a plain (decompressed) tar.
    plain = tmp_path / "etc.tar"
    cli("export", "/etc", "-F", str(plain))
    with tarfile.open(plain, mode="r:") as tar:
        assert "etc/passwd" in tar.getnames()


# --- build ---------------------------------------------------------------------------------


def test_build_dockerfile(cli: Cli, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "payload.txt").write_text("payload from the build context\n")
    (context / "Dockerfile").write_text(
        "FROM docker.io/library/busybox:latest\n"
        "RUN echo built-by-run > /built.txt\n"
        "WORKDIR /app\n"
        "ENV GREETING=hello-env\n"
        "COPY payload.txt ./payload.txt\n"
        'RUN echo "$GREETING in $(pwd)" > marker.txt && env > env.txt && cp payload.txt seen.txt\n'
        'CMD ["sh"]\n'
    )
    tag = f"pytest-build-{uuid.uuid4().hex[:8]}:v1"
    built = cli("-o", "json", "build", str(context), "--tag", tag).json()
    image = built["image"]
    assert UUID_RE.fullmatch(image) and built["tag"] == tag, built

    # --tag: the tag resolves to the built image.
    cli("use", f"tag:{tag}")
    assert cli("-o", "json", "use").json()["current_image"] == image
    assert tag in cli("images").out

    assert cli("cat", "/built.txt").out == "built-by-run\n"
    # WORKDIR: the RUN ran in /app (created on demand); ENV: passed to the RUN's env.
    assert cli("cat", "/app/marker.txt").out == "hello-env in /app\n"
    env_lines = cli("cat", "/app/env.txt").out.splitlines()
    assert "GREETING=hello-env" in env_lines, env_lines
    # COPY: the context file landed in the workdir and was visible to the next RUN.
    assert cli("cat", "/app/payload.txt").out == "payload from the build context\n"
    assert cli("cat", "/app/seen.txt").out == "payload from the build context\n"
    listing = cli("ls", "/app").out
    for name in ("env.txt", "marker.txt", "payload.txt", "seen.txt"):
        assert re.search(rf" {re.escape(name)}$", listing, re.M), listing

