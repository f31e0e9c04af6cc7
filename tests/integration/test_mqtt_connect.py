"""Connecting to a real mosquitto: a worker waits for a broker that starts late and comes back after a
restart; a device that loses the broker ends its sessions; TLS with the CA given by ``--ca-file``; a
certificate nobody vouches for is refused in words."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiomqtt")

from mqtt_broker import Broker, _free_port, next_event, run_broker, settings_for
from system_requirements import stop_process
from transport_signals import tone_agent

from moss_agent.transports import mqtt_process
from moss_agent.transports.mqtt import MqttClient, MqttSettings, MqttWorker

REPO = Path(__file__).resolve().parents[2]
USERS = {"worker": "worker-secret", "dev1": "pw-dev1"}


def worker_process(port: int, worker_id: str, *flags: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "integration"), str(REPO)]),
        "MOSS_MQTT_PASSWORD": USERS["worker"],
    }
    command = [
        sys.executable, "-m", "moss_agent.transports.mqtt", "--handler", "transport_signals:tone_agent",
        "--broker", f"127.0.0.1:{port}", "--username", "worker", "--worker-id", worker_id, *flags,
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def line_with(stream: object, text: str, timeout: float = 20) -> str:
    """The next line of ``stream`` (a process pipe) that contains ``text``."""

    def read() -> str:
        for line in stream:  # type: ignore[attr-defined]
            if text in line:
                return str(line)
        raise AssertionError(f"the stream ended before a line with {text!r}")

    return await asyncio.wait_for(asyncio.to_thread(read), timeout)


async def greeted(broker: Broker, settings: MqttSettings | None = None) -> None:
    """A device opens a session and hears the tone agent's hello."""
    async with MqttClient(settings or settings_for(broker, "dev1")) as client:
        session = await client.open_session(codec="pcm16")
        assert (await next_event(session, "hello"))["client"] == "dev1"
        await session.close()


async def test_a_worker_waits_for_a_late_broker_and_comes_back_after_a_restart(tmp_path: Path) -> None:
    port = _free_port()
    proc = worker_process(port, "patient")
    try:
        async with asyncio.timeout(60):
            # No broker yet: the worker says so and keeps trying instead of exiting.
            line = await line_with(proc.stderr, "trying again")
            assert f"could not connect to the MQTT broker at 127.0.0.1:{port}" in line, line
            for run in ("first", "restarted"):
                (tmp_path / run).mkdir()
                with run_broker(tmp_path / run, USERS, port=port) as broker:
                    assert (await line_with(proc.stdout, "ready")).strip() == "ready patient"
                    await greeted(broker)
            assert proc.poll() is None
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        stop_process(proc)
        print(proc.stderr.read() if proc.stderr else "")  # shown by pytest when the test failed


async def test_a_device_that_loses_the_broker_ends_its_sessions_with_an_error(tmp_path: Path) -> None:
    with run_broker(tmp_path, USERS) as broker:
        serving = MqttWorker(tone_agent, settings_for(broker, "worker"), worker_id="steady")
        task = asyncio.create_task(serving.run())
        try:
            async with asyncio.timeout(30), MqttClient(settings_for(broker, "dev1")) as client:
                await serving.ready.wait()
                session = await client.open_session(codec="pcm16")
                assert (await next_event(session, "hello"))["client"] == "dev1"
                # A connection with the same MQTT client id takes over: the broker drops the device's.
                async with settings_for(broker, "dev1").client(f"moss-client-dev1-{client.instance}"):
                    error = await next_event(session, "error")
                    assert error["code"] == "broker_lost" and error["fatal"], error
                    await asyncio.wait_for(session.ended.wait(), 5)
            assert not task.done(), "the worker serves on: only the device lost its connection"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed: (ca.pem, server.pem, server.key)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, ca: bool):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(certificate("test CA", ca_key, "test CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        certificate("127.0.0.1", server_key, "test CA", ca_key, False).public_bytes(serialization.Encoding.PEM)
    )
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


async def test_tls_with_the_ca_file_and_an_untrusted_certificate_refused_in_words(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    with run_broker(tmp_path, USERS, tls=(cert, key)) as broker:
        password = tmp_path / "worker.pw"
        password.write_text(USERS["worker"])
        flags = ["--handler", "m:f", "--broker", f"127.0.0.1:{broker.port}", "--username", "worker",
                 "--password-file", str(password)]  # fmt: skip
        settings = mqtt_process.settings_from_args(mqtt_process.build_parser().parse_args([*flags, "--ca-file", str(ca)]))
        serving = MqttWorker(tone_agent, settings, worker_id="tls")
        task = asyncio.create_task(serving.run())
        try:
            async with asyncio.timeout(30):
                await serving.ready.wait()
                device = settings_for(broker, "dev1")
                context = ssl.create_default_context(cafile=str(ca))
                await greeted(broker, MqttSettings(**{**device.__dict__, "tls_context": context}))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        # --tls alone trusts only the system's CAs: the worker stops at once and says why.
        proc = worker_process(broker.port, "doubtful", "--tls")
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            assert proc.returncode == 1, err
            assert f"error: the TLS certificate of the MQTT broker at 127.0.0.1:{broker.port} is not trusted" in err
            assert "--ca-file" in err and "Traceback" not in err
        finally:
            stop_process(proc)
