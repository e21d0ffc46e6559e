"""Token rotation without a restart: `--token-file` is read again when it changes.

Unit tests of `augsvc.server.tokens` on real files (rewrites, a bad write, a Kubernetes
Secret's symlink swap), then a real `augsvc serve --workers 2` whose token is rotated
under a running loader, and the start-up errors of a bad token file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from serverproc import REPO_ROOT, running_server
from test_server import FAST, SMALL, connect, wait_for

from augsvc import AugsvcError, wire
from augsvc.client import AugmentLoader
from augsvc.server import ServerConfig
from augsvc.server.tokens import TokenFile, read_tokens
from augsvc.wire._proto import augment_pb2 as pb

OLD, NEW = "old-token-0123", "new-token-4567"


def _write(path: Path, text: str) -> None:
    """Replace `path` atomically, as a careful operator (or kubelet) does."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)


def test_a_token_file_holds_one_token_a_line(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n  {OLD}  \n\n{NEW}\n")
    assert read_tokens(path) == {OLD.encode(), NEW.encode()}
    path.write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty"):
        read_tokens(path)
    path.write_text("tab\tinside\n")
    with pytest.raises(ValueError, match="token 1 is not printable"):
        read_tokens(path)
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="cannot read"):
        read_tokens(path)
    with pytest.raises(ValueError, match=r"cannot read .*missing"):
        read_tokens(tmp_path / "missing")


def test_a_changed_file_is_read_again_and_a_bad_one_keeps_the_tokens(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    path.write_text(OLD)
    tokens = TokenFile(path, recheck_s=0)
    assert tokens.tokens() == {OLD.encode()}
    _write(path, f"{OLD}\n{NEW}\n")
    assert tokens.tokens() == {OLD.encode(), NEW.encode()}
    with caplog.at_level(logging.WARNING, logger="augsvc.server"):
        path.write_text("")  # truncated in place: a half-done write
        assert tokens.tokens() == {OLD.encode(), NEW.encode()}
        assert tokens.tokens() == {OLD.encode(), NEW.encode()}  # unchanged: no second warning
        path.unlink()
        assert tokens.tokens() == {OLD.encode(), NEW.encode()}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "is empty" in warnings[0] and "cannot read" in warnings[1]
    assert all("2 token(s) read before stay accepted" in w for w in warnings)
    path.write_text(NEW)  # in place, not renamed: the size and times still change
    assert tokens.tokens() == {NEW.encode()}


def test_a_secret_volumes_symlink_swap_is_seen(tmp_path: Path) -> None:
    """kubelet's layout: token -> ..data/token, ..data -> a timestamped folder, swapped."""
    for name, token in (("v1", OLD), ("v2", NEW)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "token").write_text(token + "\n")
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "token").symlink_to("..data/token")
    tokens = TokenFile(tmp_path / "token", recheck_s=0)
    assert tokens.tokens() == {OLD.encode()}
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert tokens.tokens() == {NEW.encode()}


def test_the_file_is_looked_at_at_most_once_per_recheck(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(OLD)
    tokens = TokenFile(path, recheck_s=3600)
    _write(path, NEW)
    assert tokens.tokens() == {OLD.encode()}  # not before the recheck interval is up


def test_a_bad_token_file_fails_the_start_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        ServerConfig({"x": tmp_path}, token_file=tmp_path / "missing").validate()
    (tmp_path / "token").write_text(OLD)
    with pytest.raises(ValueError, match="not both"):
        ServerConfig({"x": tmp_path}, token=OLD, token_file=tmp_path / "token").validate()
    (tmp_path / "empty").write_text("\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "augsvc", "serve", "--dataset", f"x={tmp_path}", "--port", "0",
         "--device", "cpu", "--token-file", str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert f"augsvc serve: --token-file: {tmp_path / 'empty'} is empty" in result.stderr
    assert "Traceback" not in result.stderr


def _accepted(address: str, token: str) -> bool:
    """Whether a fresh connection's ListDatasets with `token` is let through."""
    with connect(address) as channel:
        try:
            wire.AugmentStub(channel).ListDatasets(
                pb.ListDatasetsRequest(), metadata=(("authorization", f"Bearer {token}"),),
                timeout=10)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            return False
    return True


def _every_worker(address: str, token: str, accepted: bool) -> bool:
    """Eight fresh connections (spread over the workers by SO_REUSEPORT) all agree."""
    return all(_accepted(address, token) == accepted for _ in range(8))


def test_a_token_is_rotated_without_a_restart(jpeg_folder: Path, tmp_path: Path) -> None:
    """Old, then old and new, then new alone: a loader on the old token runs on through
    the overlap, one on the new token after it; the old one is refused at the end."""
    path = tmp_path / "token"
    path.write_text(OLD + "\n")
    with running_server({"photos": jpeg_folder}, *FAST, "--token-file", str(path),
                        workers=2) as server:
        assert _every_worker(server.address, OLD, True)
        assert _every_worker(server.address, NEW, False)
        old_loader = AugmentLoader(server.address, "photos", SMALL, 4, seed=1, token=OLD)
        first = list(old_loader)

        _write(path, f"{OLD}\n{NEW}\n")
        wait_for(lambda: _every_worker(server.address, NEW, True), 20, "the new token")
        assert _every_worker(server.address, OLD, True)
        assert len(first) == len(list(old_loader)) == 3  # the old token runs on
        new_loader = AugmentLoader(server.address, "photos", SMALL, 4, seed=1, token=NEW)
        assert len(list(new_loader)) == 3

        _write(path, NEW + "\n")
        wait_for(lambda: _every_worker(server.address, OLD, False), 20, "the old token refused")
        assert _every_worker(server.address, NEW, True)
        assert len(list(new_loader)) == 3
        with pytest.raises(AugsvcError) as info:
            list(old_loader)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        log = server.stderr()
        # once per worker that had a call since (SO_REUSEPORT may send them all to one)
        assert log.count("read again: 2 token(s) accepted") in (1, 2), log
        assert log.count("read again: 1 token(s) accepted") in (1, 2), log
        assert OLD not in log and NEW not in log
