"""The README as a new user meets it: its offline shell commands and its Python example, run exactly as
written in a scratch folder; a command a user cannot paste and run fails here.

Offline commands are those with ``--tiny`` or ``--help`` (tiny random checkpoints, no network, no
LLM server). They run through bash with ``.venv/bin`` first on PATH, as ``source
.venv/bin/activate`` leaves a shell, and with a cache folder of their own, where the first
``--tiny`` command makes the tiny checkpoints and the later ones reuse them, as on a user's machine. A command that starts a server (it prints a URL
and keeps running) is stopped with Ctrl-C, which must end it cleanly.

The Python example runs unchanged against the hub ids it names: they resolve, offline, to tiny
checkpoints placed in a Hugging Face cache of the test's own; only its LLM URL is pointed at a real
local OpenAI-compatible server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moss_agent.model_ids import CODEC_MODEL_ID, REALTIME_MODEL_ID

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SERVER_URL = re.compile(r"https?://\S+")
COMMAND_TIMEOUT_S = 240


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comment lines dropped)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def is_offline(command: str) -> bool:
    return "--tiny" in command.split() or "--help" in command.split()


OFFLINE_COMMANDS = [command for command in shell_commands() if is_offline(command)]


def test_the_readme_gives_setup_run_and_test_commands() -> None:
    """The three commands a newcomer needs are there, and CI runs the same install and test commands."""
    commands = shell_commands()
    install = next(c for c in commands if "scripts/install.sh" in c)
    test = next(c for c in commands if "pytest" in c)
    assert any(c.startswith("moss-agent reply --tiny") for c in OFFLINE_COMMANDS), "the offline main job is missing"
    ci = (REPO / ".ci" / "run").read_text()
    assert install in ci and test in ci, ".ci/run must run the README's install and test commands verbatim"


@pytest.fixture(scope="module")
def user_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A shell after ``source .venv/bin/activate``, with a fresh cache folder for the tiny checkpoints."""
    cache = tmp_path_factory.mktemp("moss_cache")
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv_bin.parent),
        MOSS_AGENT_CACHE=str(cache),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A folder laid out like a fresh clone for what the commands read (the examples)."""
    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run_like_a_user(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` through bash -> (exit status, output). A server that prints a URL and keeps
    running gets SIGINT, as Ctrl-C would send, and must then exit by itself."""
    proc = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if SERVER_URL.search(line):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        waited = 0.0
        while proc.poll() is None and waited < COMMAND_TIMEOUT_S:
            if serving.wait(0.5) and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=60)
                break
            waited += 0.5
        if proc.poll() is None:
            raise AssertionError(f"{command!r} neither finished nor served within {COMMAND_TIMEOUT_S} s:\n{''.join(lines)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize("command", OFFLINE_COMMANDS)
def test_offline_command_runs_as_written(command: str, scratch: Path, user_env: dict[str, str]) -> None:
    status, output = run_like_a_user(command, scratch, user_env)
    assert status == 0, f"{command!r} exited with {status}:\n{output}"
    assert "Traceback" not in output, output


def place_in_hub_cache(hub: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` where huggingface_hub keeps a downloaded snapshot of ``repo_id``."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture
def offline_hub(tmp_path: Path, tiny_realtime_dir: Path, tiny_codec_dir: Path) -> Iterator[dict[str, str]]:
    """Environment in which the released hub ids resolve, offline, to tiny checkpoints."""
    home = tmp_path / "hf"
    place_in_hub_cache(home / "hub", REALTIME_MODEL_ID, tiny_realtime_dir)
    place_in_hub_cache(home / "hub", CODEC_MODEL_ID, tiny_codec_dir)
    yield {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_python_example_runs_to_the_end(
    scratch: Path, user_env: dict[str, str], offline_hub: dict[str, str]
) -> None:
    from moss_agent.testing import FakeOpenAIServer

    (example,) = code_blocks("python")
    urls = re.findall(r'base_url="([^"]+)"', example)
    assert len(urls) == 1, "the example should name its LLM URL once"
    server = FakeOpenAIServer(["Why did the codec cross the road? To reach the other frame."])
    server.start_in_thread()
    try:
        script = scratch / "readme_example.py"
        script.write_text(example.replace(urls[0], server.base_url))
        result = subprocess.run(
            [sys.executable, str(script)], cwd=scratch, env={**user_env, **offline_hub},
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        )  # fmt: skip
    finally:
        server.stop_thread()
    assert result.returncode == 0, result.stderr
    assert "Why did the codec cross the road?" in result.stdout  # the LLM's text streamed through the turn
    assert "the user heard:" in result.stdout
    assert len(server.chat_requests) == 1
