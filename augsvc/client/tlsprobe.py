"""Why a connection was closed during setup: a TLS probe that names the likely mismatch.

gRPC reports a plaintext client at a TLS server, and a client without the certificate
a mutual-TLS server requires, as the same "Socket closed". `tls_mismatch` opens one
TLS connection of its own (Python's `ssl`, no certificate check: it only asks what
the server speaks) and returns a sentence saying what was probably wrong, or None.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator

__all__ = ["looks_like_setup_failure", "tls_mismatch"]

# details of a connection that closed or failed before any call could start
_SETUP_FAILURES = ("Socket closed", "Tls handshake failed", "Handshake failed",
                   "WRONG_VERSION_NUMBER", "handshake")


def looks_like_setup_failure(details: str) -> bool:
    """Whether an UNAVAILABLE status's details point at the connection setup (TLS)."""
    return any(s in details for s in _SETUP_FAILURES)


def tls_mismatch(host: str, port: int, *, tls: bool, client_certificate: tuple[bytes, bytes]
                 | None, timeout: float) -> str | None:
    """What is probably wrong between this client's TLS settings and the server's, or None.

    `tls`: whether the client uses TLS; `client_certificate`: its (chain, key) PEM.
    """
    verdict = _probe(host, port, client_certificate if tls else None, timeout)
    if verdict is None:
        return None
    if verdict == "plaintext":
        return ("the server does not speak TLS: drop root_certificates, or start it with "
                "--tls-cert/--tls-key") if tls else None
    if not tls:
        more = (" and a client certificate (client_certificate=(chain, key)): it requires "
                "mutual TLS") if verdict == "closed after handshake" else ""
        return (f"the server expects TLS, this loader connects in plaintext: pass "
                f"root_certificates (the CA that signed the server's certificate){more}")
    if verdict == "closed after handshake":
        if client_certificate is None:
            return ("the server requires a client certificate (mutual TLS, --tls-client-ca): "
                    "pass client_certificate=(chain, key)")
        return ("the server refused this client certificate: it must be signed by the CA "
                "of the server's --tls-client-ca and allow clientAuth")
    return None


def _probe(host: str, port: int, client_certificate: tuple[bytes, bytes] | None,
           timeout: float) -> str | None:
    """"plaintext", "closed after handshake", "tls" or None (could not tell)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking what the server speaks
    context.set_alpn_protocols(["h2"])
    try:
        with contextlib.ExitStack() as stack:
            if client_certificate is not None:
                chain, key = (stack.enter_context(_pem_file(pem)) for pem in client_certificate)
                context.load_cert_chain(chain, key)
            raw = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            try:
                tls = stack.enter_context(context.wrap_socket(raw))
            except ssl.SSLError as exc:
                return _verdict(exc, "plaintext" if exc.reason == "WRONG_VERSION_NUMBER" else None)
            # An HTTP/2 server sends its SETTINGS frame first; a server that wanted a
            # certificate it did not get (TLS 1.3 checks it after the handshake) closes.
            try:
                return "tls" if tls.recv(1) else "closed after handshake"
            except ssl.SSLError as exc:
                return _verdict(exc, None)
    except (OSError, ValueError):
        return None


def _verdict(exc: ssl.SSLError, otherwise: str | None) -> str | None:
    """A TLS alert about the client's certificate (required, bad, unknown CA) counts as
    "closed after handshake"; anything else is `otherwise`."""
    return "closed after handshake" if "CERTIFICATE" in str(exc.reason).upper() else otherwise


@contextlib.contextmanager
def _pem_file(pem: bytes) -> Iterator[str]:
    """A private temporary file holding `pem` (ssl loads certificates from files only)."""
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        yield path
    finally:
        os.unlink(path)
