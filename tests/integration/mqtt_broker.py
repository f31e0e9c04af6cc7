"""A real mosquitto broker for tests: 127.0.0.1, a free port, a password file and per-client topic ACLs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from system_requirements import MOSQUITTO, find_binary, require

# Workers may use every topic; a client only its own subtree, plus reading worker liveness.
ACL = """\
user worker
topic readwrite moss/v1/#

pattern readwrite moss/v1/c/%u/#
pattern read moss/v1/w/+/status
"""


@dataclass
class Broker:
    host: str
    port: int
    passwords: dict[str, str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_broker(tmp: Path, users: dict[str, str]) -> Iterator[Broker]:
    require(MOSQUITTO)
    mosquitto, mosquitto_passwd = MOSQUITTO.path, find_binary("mosquitto_passwd")
    assert mosquitto is not None and mosquitto_passwd is not None
    password_file = tmp / "passwd"
    for i, (user, password) in enumerate(users.items()):
        args = [mosquitto_passwd, "-b", *(["-c"] if i == 0 else []), str(password_file), user, password]
        subprocess.run(args, check=True, capture_output=True)
    password_file.chmod(0o600)
    (tmp / "acl").write_text(ACL)
    (tmp / "acl").chmod(0o600)
    port = _free_port()
    config = tmp / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {password_file}\n"
        f"acl_file {tmp / 'acl'}\n"
        "persistence false\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        "max_keepalive 60\n"
        # mosquitto started as root drops to the 'mosquitto' user, which cannot read our temp files.
        "user root\n"
    )
    log = (tmp / "mosquitto.log").open("wb")
    proc = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(tmp / 'mosquitto.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start listening within 10 s")
            time.sleep(0.05)
        yield Broker("127.0.0.1", port, dict(users))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
