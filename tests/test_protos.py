"""The generated augsvc/wire/_proto/ package is fresh: regenerating it changes nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) generates the code")

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_protos.py"
COMMITTED = ROOT / "augsvc" / "wire" / "_proto"
PROTO = "augsvc/v1/augment.proto"


def _generate(out: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True,
                   capture_output=True, text=True)


def test_committed_files_are_byte_identical_to_a_fresh_generation(tmp_path: Path) -> None:
    _generate(tmp_path)
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == ["__init__.py", "augment_pb2.py", "augment_pb2.pyi", "augment_pb2_grpc.py"]
    stale = [n for n in fresh if (COMMITTED / n).read_bytes() != (tmp_path / n).read_bytes()]
    assert not stale, (
        f"augsvc/wire/_proto is stale ({', '.join(stale)}): run python scripts/{SCRIPT.name}. "
        f"Committed code is from grpcio-tools {_generated_by(COMMITTED)}, this one is "
        f"{_generated_by(tmp_path)}: regenerate with the version pyproject.toml pins."
    )


def _generated_by(package: Path) -> str:
    match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                      (package / "augment_pb2_grpc.py").read_text())
    return match.group(1) if match else "?"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    _generate(tmp_path / "a")
    _generate(tmp_path / "b")
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_check_mode_fails_when_stale(tmp_path: Path) -> None:
    _generate(tmp_path)
    check = [sys.executable, str(SCRIPT), "--check", "--out", str(tmp_path)]
    assert subprocess.run(check, capture_output=True).returncode == 0
    (tmp_path / "augment_pb2.py").write_text("# edited by hand\n")
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1 and "augment_pb2.py" in result.stderr


def _clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_committed_descriptor_matches_the_proto(tmp_path: Path) -> None:
    """Independent of formatting: the schema inside augment_pb2 is the .proto's schema."""
    from google.protobuf import descriptor_pb2

    from augsvc.wire._proto import augment_pb2

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"--proto_path={ROOT / 'protos'}",
                        f"--descriptor_set_out={out}", str(ROOT / "protos" / PROTO)]) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _clear_json_names(compiled.message_type)  # the embedded descriptor omits derived json_name
    committed = descriptor_pb2.FileDescriptorProto.FromString(augment_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled


def test_generated_modules_import_from_the_flat_package() -> None:
    from augsvc.wire._proto import augment_pb2, augment_pb2_grpc

    assert augment_pb2.Frame.__module__ == "augsvc.wire._proto.augment_pb2"
    assert augment_pb2.DESCRIPTOR.name == PROTO
    assert augment_pb2_grpc.AugmentStub is not None
