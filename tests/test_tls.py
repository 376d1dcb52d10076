"""`wss://` with --tls-cert/--tls-key: the same protocol over TLS, and HTTP over TLS too."""

import datetime
import json
import ssl
import time
from functools import partial

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_websocket import open_websocket_url

from orderlog.auth import Keys, mint
from orderlog.service.server import serve
from orderlog.service.settings import Settings

SECRET = "tls-test-secret-0123456789abcdef0123"


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_wss_serves_the_protocol_and_a_large_replay(tmp_path):
    """Over TLS a client gets welcome, acks and a replay larger than one socket buffer, in order."""
    cert, key = _self_signed(tmp_path)
    settings = Settings(db=str(tmp_path / "tls.db"), host="localhost", port=0, keys=Keys("HS256", SECRET),
                        tls_cert=str(cert), tls_key=str(key))
    client_context = ssl.create_default_context(cafile=str(cert))
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, settings, stop=stop, handle_signals=False))
            assert url.startswith("wss://localhost:")
            token = mint("s1", "staff", 600, time.time(), SECRET)
            async with open_websocket_url(f"{url}?token={token}", ssl_context=client_context) as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
                note = "x" * 900
                for i in range(120):  # ~120 KB of events to replay
                    await ws.send_message(json.dumps({"type": "command", "id": f"c{i}", "name": "add_stock",
                                                      "data": {"sku": f"s{i % 7}", "quantity": 1, "name": note[:200]}}))
                acks = 0
                while acks < 120:
                    reply = json.loads(await ws.get_message())
                    assert reply["type"] == "ack", reply
                    acks += 1
                await ws.send_message(json.dumps({"type": "subscribe", "channel": "inventory", "since": 0}))
                seqs, prev = [], 0
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "live":
                        break
                    if message["type"] == "subscribed":
                        continue
                    assert message["prev"] == prev
                    prev = message["seq"]
                    seqs.append(message["seq"])
                assert seqs == list(range(1, 121))
            stream = await trio.open_ssl_over_tcp_stream("localhost", int(url.rsplit(":", 1)[1].split("/")[0]),
                                                         ssl_context=client_context)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = await stream.receive_some()
                if not data:
                    break
                answer += data
            assert answer.startswith(b"HTTP/1.1 200")
            stop.set()
