"""TLS settings that do not match the server's get an error saying so (issue 9.3), at once.

gRPC reports all of these as "Socket closed" (or a handshake failure); the loader probes
the server and names the likely cause. Real `augsvc serve` processes with certificates
from tests/certs.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from certs import make_certs
from serverproc import ServerProcess, running_server

from augsvc.client import AugmentLoader, AugsvcError
from augsvc.core.spec import AugmentSpec

pytestmark = pytest.mark.timeout(120)

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False)
FAST = ("--dali-threads", "1", "--io-threads", "2")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def servers(jpeg_folder: Path, certs: dict[str, bytes]) -> dict[str, ServerProcess]:
    """A plaintext, a TLS and a mutual-TLS server."""
    d = Path(certs["dir"].decode())
    tls = ["--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key")]
    with contextlib.ExitStack() as stack:
        yield {
            "plaintext": stack.enter_context(running_server({"photos": jpeg_folder}, *FAST)),
            "tls": stack.enter_context(running_server({"photos": jpeg_folder}, *FAST, *tls)),
            "mutual": stack.enter_context(running_server(
                {"photos": jpeg_folder}, *FAST, *tls, "--tls-client-ca", str(d / "ca.pem"))),
        }


def _error(address: str, **kwargs) -> AugsvcError:
    start = time.monotonic()
    with pytest.raises(AugsvcError) as info:
        len(AugmentLoader(address, "photos", SPEC, 2, timeout=10, **kwargs))
    assert time.monotonic() - start < 10  # said at once, not after reconnect_timeout
    assert info.value.code is grpc.StatusCode.UNAVAILABLE and info.value.server == address
    return info.value


def test_plaintext_loader_at_a_tls_server(servers):
    error = _error(servers["tls"].address)
    assert "expects TLS" in str(error) and "root_certificates" in str(error)
    assert "client certificate" not in str(error)


def test_plaintext_loader_at_a_mutual_tls_server(servers):
    error = _error(servers["mutual"].address)
    assert "expects TLS" in str(error) and "client certificate" in str(error)


def test_missing_client_certificate(servers, certs):
    error = _error(servers["mutual"].address, root_certificates=certs["ca.pem"])
    assert "requires a client certificate" in str(error) and "client_certificate" in str(error)


def test_refused_client_certificate(servers, certs, tmp_path):
    """A certificate the server's CA did not sign."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=stranger",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
                   check=True, capture_output=True)
    error = _error(servers["mutual"].address, root_certificates=certs["ca.pem"],
                   client_certificate=(tmp_path / "c.pem", tmp_path / "k.pem"))
    assert "refused this client certificate" in str(error)


def test_tls_loader_at_a_plaintext_server(servers, certs):
    error = _error(servers["plaintext"].address, root_certificates=certs["ca.pem"])
    assert "does not speak TLS" in str(error)


def test_matching_settings_work_through_a_name(servers, certs):
    """The control: right settings fetch batches; "localhost" is resolved to 127.0.0.1 and
    the certificate still checked against the name (its SAN has DNS:localhost)."""
    port = servers["mutual"].port
    with AugmentLoader(f"localhost:{port}", "photos", SPEC, 2, root_certificates=certs["ca.pem"],
                       client_certificate=(certs["client.pem"], certs["client.key"])) as loader:
        images, _ = next(iter(loader))
        assert set(loader.stats().servers) == {f"127.0.0.1:{port}"}
    assert images.shape == (2, 32, 32, 3)
