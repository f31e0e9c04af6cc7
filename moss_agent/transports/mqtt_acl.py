"""Broker access rules for the MQTT transport, as a mosquitto dynamic-security file.

Why not an ``acl_file`` with ``pattern readwrite moss/v1/c/%u/#``: mosquitto 2.0 (Debian 12 ships
2.0.11) never checks subscriptions against an ACL file, only deliveries. A device may then join the
workers' shared subscription ``$share/moss-workers/moss/v1/c/+/request``; the broker hands it its
turn of every device's requests, the delivery check refuses them, and they are lost. The
dynamic-security plugin does check subscriptions, but its 2.0 releases have no ``%u``, so every
device gets a role naming its own subtree. See docs/mqtt.md and docs/mosquitto/.

    python -m moss_agent.transports.mqtt_acl --workers worker < users.txt > dynamic-security.json

reads ``username:password`` lines (workers named by ``--workers``, everyone else a device). To add a
device to a running broker, ``device_role_commands`` prints the ``mosquitto_ctrl`` lines.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from typing import Any

from moss_agent.transports.mqtt_protocol import DEFAULT_ROOT, Topics, check_name, check_topic_root

JsonDict = dict[str, Any]

PBKDF2_ITERATIONS = 101
"""What ``mosquitto_ctrl dynsec`` itself uses in 2.0."""


def _client(username: str, password: str, roles: list[str]) -> JsonDict:
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PBKDF2_ITERATIONS,
        "roles": [{"rolename": role} for role in roles],
    }


def _acl(kind: str, topic: str) -> JsonDict:
    return {"acltype": kind, "topic": topic, "allow": True}


def worker_role(root: str = DEFAULT_ROOT, group: str = "moss-workers") -> JsonDict:
    """Workers: the shared request subscription of ``group`` and every topic under ``root``."""
    topics = Topics(check_topic_root(root))
    everything = f"{topics.root}/#"
    return {
        "rolename": "moss-worker",
        "acls": [
            _acl("subscribeLiteral", topics.shared_requests(check_name(group, "group"))),
            _acl("subscribePattern", everything),
            _acl("publishClientSend", everything),
            _acl("publishClientReceive", everything),
            _acl("unsubscribePattern", everything),
        ],
    }


def device_acls(device: str, root: str = DEFAULT_ROOT) -> list[tuple[str, str]]:
    """(acltype, topic) pairs a device needs: publish its requests, will and up topics; read its
    events, down topics and worker liveness. Nothing else, so a wrong topic is refused by the broker."""
    topics = Topics(check_topic_root(root))
    client = check_name(device, "device username")
    session = topics.session(client, "+")
    published = [
        topics.request(client),
        topics.client_status(client),
        f"{session}/up/audio",
        f"{session}/up/control",
    ]
    read = [topics.client_event(client), topics.down_filter(client), topics.all_worker_status()]
    return [
        *(("publishClientSend", topic) for topic in published),
        *(("subscribePattern", topic) for topic in read),
        *(("publishClientReceive", topic) for topic in read),
        *(("unsubscribePattern", topic) for topic in read),
    ]


def device_role(device: str, root: str = DEFAULT_ROOT) -> JsonDict:
    return {"rolename": f"moss-device-{device}", "acls": [_acl(k, t) for k, t in device_acls(device, root)]}


def dynsec_config(
    workers: dict[str, str], devices: dict[str, str], *, root: str = DEFAULT_ROOT, group: str = "moss-workers"
) -> JsonDict:
    """A complete ``plugin_opt_config_file`` for mosquitto's dynamic-security plugin.

    ``workers`` and ``devices`` map usernames to passwords. Anything not granted is denied,
    subscriptions included.
    """
    clients = [_client(user, password, ["moss-worker"]) for user, password in workers.items()]
    clients += [_client(user, password, [f"moss-device-{user}"]) for user, password in devices.items()]
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": clients,
        "groups": [],
        "roles": [worker_role(root, group), *(device_role(user, root) for user in devices)],
    }


def device_role_commands(device: str, root: str = DEFAULT_ROOT) -> list[str]:
    """``mosquitto_ctrl`` arguments that add ``device`` (already created with ``createClient``)."""
    role = f"moss-device-{device}"
    lines = [f"dynsec createRole {role}"]
    lines += [f"dynsec addRoleACL {role} {kind} {topic} allow" for kind, topic in device_acls(device, root)]
    lines.append(f"dynsec addClientRole {device} {role}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moss_agent.transports.mqtt_acl",
        description="Write a mosquitto dynamic-security file for moss_agent MQTT from 'username:password' "
        "lines on stdin (workers named by --workers, everyone else a device).",
    )
    parser.add_argument("--workers", nargs="+", default=["worker"], help="usernames of workers")
    parser.add_argument("--topic-root", default=DEFAULT_ROOT)
    parser.add_argument("--group", default="moss-workers")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers: dict[str, str] = {}
    devices: dict[str, str] = {}
    for number, line in enumerate(sys.stdin, 1):
        user, sep, password = line.rstrip("\n").partition(":")
        if not line.strip():
            continue
        if not sep or not user or not password:
            print(f"stdin:{number}: expected 'username:password'", file=sys.stderr)
            return 2
        (workers if user in args.workers else devices)[user] = password
    json.dump(dynsec_config(workers, devices, root=args.topic_root, group=args.group), sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
