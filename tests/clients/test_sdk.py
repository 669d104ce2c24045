"""contree-sdk 0.3.6 end to end against a live Boxwood server.

The SDK polls GET /v1/operations/{id} and parses every response strictly (cattrs),
so any missing or mistyped field in a server response fails these tests.

Covers: token info (/whoami) through JWTAuth, the `ContreeSync(base_url=, token=)`
shorthand (IAMAuth, sends a `Project` header) and an auth.ini profile written by
`contree auth`; image listing (tagged and all, iteration), lookup by tag and UUID,
unknown tags; runs (shell and exec form with args/env/cwd, stdout/stderr/exit code,
elapsed time); stdin/stdout round trips (text with non-ASCII through
popen().communicate(), binary through base64); files (upload dedup, injection of
local files, bytes and an executable with mode/uid/gid; `apply_files`); reading,
listing and downloading files from an image; a persisted chain of
`disposable=False` runs (A -> B, B sees both changes, A and the base stay
unchanged, `tag=` on a run); and the async client with concurrent runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from contree_sdk import Contree, ContreeSync
from contree_sdk.auth import JWTAuth
from contree_sdk.config import ContreeConfig
from contree_sdk.sdk.exceptions import NotFoundError
from contree_sdk.sdk.objects.image_like.state import ImageState
from contree_sdk.utils.models.file import UploadFileSpec

from conftest import BUSYBOX_TAG, Server

RUN_TIMEOUT = 300  # seconds, per run (the VM-side timeout; polling waits as long)


@pytest.fixture(scope="session")
def sdk_config(server: Server) -> ContreeConfig:
    return ContreeConfig(
        auth=JWTAuth(token=server.token, base_url=server.url),
        operation_timeout=RUN_TIMEOUT,
        transport_timeout=60.0,
    )


@pytest.fixture(scope="session")
def sdk(sdk_config: ContreeConfig) -> ContreeSync:
    return ContreeSync(sdk_config)


@pytest.fixture(scope="session")
def busybox(sdk: ContreeSync):
    image = sdk.images.use(BUSYBOX_TAG, strict=True)
    assert image.uuid is not None, f"{BUSYBOX_TAG} resolved without a UUID: {image!r}"
    return image


# --- auth ----------------------------------------------------------------------------------


def test_token_info(sdk: ContreeSync) -> None:
    info = sdk.get_token_info(refresh=True)
    UUID(str(info.token_uuid))
    for permission in ("spawn", "spawn_disposable", "list", "import", "set_image_tag", "cancel"):
        assert info.permissions.get(permission) is True, info.permissions


def test_shorthand_constructor_with_project_header(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `ContreeSync(base_url=, token=)` builds IAMAuth: it sends `Project: NEBIUS_PROJECT_ID`
    # (the literal env-var name, as no such variable is set). A JWT server must not mind.
    monkeypatch.delenv("NEBIUS_PROJECT_ID", raising=False)
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path))  # no auth.ini to fall back on
    client = ContreeSync(base_url=server.url, token=server.token)
    assert client.get_token_info().permissions.get("list") is True
    assert any(image.tag == BUSYBOX_TAG for image in client.images(tagged=True))


def test_auth_ini_profile_written_by_cli(
    cli_home: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK falls back to the CLI's auth.ini for JWTAuth fields left at their defaults.
    for var in ("CONTREE_TOKEN", "CONTREE_BASE_URL", "CONTREE_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONTREE_HOME", str(cli_home / "contree"))
    client = ContreeSync(ContreeConfig(auth=JWTAuth()))
    assert client.config.auth.base_url == server.url
    assert client.get_token_info().permissions.get("spawn") is True


# --- images --------------------------------------------------------------------------------


def test_images_listing(sdk: ContreeSync, busybox) -> None:
    tagged = sdk.images(tagged=True)
    assert (busybox.uuid, BUSYBOX_TAG) in {(i.uuid, i.tag) for i in tagged}, tagged
    assert all(i.tag for i in tagged), f"untagged image in tagged=True listing: {tagged}"

    everything = sdk.images(number=None)
    assert busybox.uuid in {i.uuid for i in everything}
    assert len(everything) >= len(tagged)
    # Iterating the manager pages through the same listing.
    assert busybox.uuid in {i.uuid for i in sdk.images}

    by_uuid = sdk.images.use(str(busybox.uuid), strict=True)
    assert by_uuid.uuid == busybox.uuid
    assert by_uuid.state == ImageState.PULLED

    with pytest.raises(NotFoundError):
        sdk.images.use(f"no-such-image-{uuid4().hex[:8]}:latest", strict=True)
    with pytest.raises(NotFoundError):
        sdk.images.use(str(uuid4()), strict=True)


def test_read_list_download_from_image(busybox, tmp_path: Path) -> None:
    passwd = busybox.read("/etc/passwd")
    assert passwd.startswith(b"root:x:0:0:"), passwd
    # /bin/sh is a symlink to busybox; reading follows it.
    assert busybox.read("/bin/sh")[:4] == b"\x7fELF"

    target = tmp_path / "passwd.copy"
    assert busybox.download("/etc/passwd", target) == target
    assert target.read_bytes() == passwd

    root = {entry.name: entry for entry in busybox.ls("/")}
    assert {"bin", "etc", "tmp"} <= set(root), sorted(root)
    assert root["etc"].is_dir
    etc = {entry.name: entry for entry in root["etc"].ls()}
    assert "passwd" in etc and etc["passwd"].is_file, sorted(etc)
    assert etc["passwd"].size == len(passwd)
    assert etc["passwd"].read() == passwd

    with pytest.raises(NotFoundError):
        busybox.read("/no/such/file")


# --- runs ----------------------------------------------------------------------------------


def test_run_shell_stdout_stderr_exit_code(busybox) -> None:
    done = busybox.run(shell="echo out-line; echo err-line >&2; exit 5", timeout=RUN_TIMEOUT).wait()
    assert done.state == ImageState.SUCCEEDED
    assert done.exit_code == 5, done
    assert done.stdout == "out-line\n", done
    assert done.stderr == "err-line\n", done
    assert done.elapsed.total_seconds() > 0, done
    assert done.result.truncated is False
    # Disposable (the SDK default): no image is produced.
    assert done.uuid is None, done


def test_run_command_args_env_cwd(busybox) -> None:
    done = busybox.run(
        "sh",
        args=["-c", 'echo "$1|$FOO|$(pwd)"', "sh", "two  spaces"],
        env={"FOO": "bar baz"},
        cwd="/tmp",
        timeout=RUN_TIMEOUT,
    ).wait()
    assert (done.exit_code, done.stdout, done.stderr) == (0, "two  spaces|bar baz|/tmp\n", ""), done


def test_popen_communicate_text_roundtrip(busybox) -> None:
    text = "hello\nnon-ascii: wörld ✓\n"
    proc = busybox.popen(["cat"], text=True, timeout=RUN_TIMEOUT)
    stdout, stderr = proc.communicate(input=text)
    assert proc.returncode == 0, proc
    assert stdout == text
    assert stderr == ""


def test_run_binary_stdin_stdout_roundtrip(busybox) -> None:
    data = bytes(range(256)) * 16  # every byte value: must travel as base64 both ways
    done = busybox.run("cat", stdin=data, stdout=bytes, timeout=RUN_TIMEOUT).wait()
    assert done.exit_code == 0, done
    assert done.stdout == data, f"got {len(done.stdout)} bytes back, first {done.stdout[:32]!r}"


def test_files_upload_and_inject(sdk: ContreeSync, busybox, tmp_path: Path) -> None:
    text_file = tmp_path / "input.txt"
    text_file.write_text("injected text file\n")
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho \"hello from $0\"\n")

    # Upload is content-addressed: the same content yields the same stored file.
    uploaded = sdk.files.upload(text_file)
    assert uploaded.sha256 == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert sdk.files.upload(text_file).uuid == uploaded.uuid

    blob = bytes([0, 1, 2, 254, 255])
    done = busybox.run(
        shell=(
            "cat /data/input.txt && /opt/tool/hello.sh && od -An -tx1 /deep/nested/blob.bin"
            " && stat -c '%n %a %u %g' /data/input.txt /opt/tool/hello.sh /deep/nested/blob.bin"
        ),
        files={
            "/data/input.txt": text_file,
            "/opt/tool/hello.sh": UploadFileSpec(source=script, mode=0o755, uid=1000, gid=1000),
            "/deep/nested/blob.bin": blob,
        },
        timeout=RUN_TIMEOUT,
    ).wait()
    assert done.exit_code == 0, done
    lines = done.stdout.splitlines()
    assert lines[0] == "injected text file", done.stdout
    assert lines[1] == "hello from /opt/tool/hello.sh", done.stdout
    assert lines[2].split() == ["00", "01", "02", "fe", "ff"], done.stdout
    assert lines[3:] == [
        "/data/input.txt 644 0 0",
        "/opt/tool/hello.sh 755 1000 1000",
        "/deep/nested/blob.bin 644 0 0",
    ], done.stdout


def test_apply_files_bakes_an_image(busybox) -> None:
    applied = busybox.apply_files({"/applied/note.txt": b"applied by sdk\n"})
    assert applied.uuid is not None and applied.uuid != busybox.uuid, applied
    assert applied.read("/applied/note.txt") == b"applied by sdk\n"
    with pytest.raises(NotFoundError):
        busybox.read("/applied/note.txt")


def test_persisted_chain(sdk: ContreeSync, busybox) -> None:
    step_a = busybox.run(shell="echo one > /chain-a.txt", disposable=False, timeout=RUN_TIMEOUT).wait()
    assert step_a.exit_code == 0, step_a
    assert step_a.uuid is not None and step_a.uuid != busybox.uuid, f"no new image for A: {step_a!r}"

    tag = f"pytest-sdk-chain-{uuid4().hex[:8]}:latest"
    step_b = step_a.run(
        shell="echo two > /chain-b.txt && cat /chain-a.txt", disposable=False, tag=tag, timeout=RUN_TIMEOUT
    ).wait()
    assert step_b.exit_code == 0 and step_b.stdout == "one\n", step_b
    assert step_b.uuid is not None and step_b.uuid not in (busybox.uuid, step_a.uuid), step_b
    assert step_b.tag == tag

    # B holds both changes; A and the base image are immutable.
    assert step_b.read("/chain-a.txt") == b"one\n"
    assert step_b.read("/chain-b.txt") == b"two\n"
    assert step_a.read("/chain-a.txt") == b"one\n"
    with pytest.raises(NotFoundError):
        step_a.read("/chain-b.txt")
    with pytest.raises(NotFoundError):
        busybox.read("/chain-a.txt")

    # `tag=` on the run tagged B, and a run on the tag sees both files.
    by_tag = sdk.images.use(tag, strict=True)
    assert by_tag.uuid == step_b.uuid
    assert (step_b.uuid, tag) in {(i.uuid, i.tag) for i in sdk.images(tagged=True)}
    check = by_tag.run(shell="cat /chain-a.txt /chain-b.txt", timeout=RUN_TIMEOUT).wait()
    assert (check.exit_code, check.stdout) == (0, "one\ntwo\n"), check


# --- async ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_client_concurrent_runs(sdk_config: ContreeConfig) -> None:
    client = Contree(replace(sdk_config))
    info = await client.get_token_info()
    assert info.permissions.get("spawn") is True

    image = await client.images.use(BUSYBOX_TAG, strict=True)
    assert image.uuid is not None
    assert (await image.read("/etc/passwd")).startswith(b"root:")
    assert any(i.tag == BUSYBOX_TAG for i in await client.images(tagged=True))

    first, second = await asyncio.gather(
        image.run(shell="echo async-one", timeout=RUN_TIMEOUT),
        image.run(shell="echo async-two >&2; exit 2", timeout=RUN_TIMEOUT),
    )
    assert (first.exit_code, first.stdout, first.stderr) == (0, "async-one\n", ""), first
    assert (second.exit_code, second.stdout, second.stderr) == (2, "", "async-two\n"), second
