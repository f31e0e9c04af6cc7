"""Shared parts of the batch subcommands (tts, dialogue, voice-design, sfx): options, JSONL input,
engine building and writing the wav files as results complete."""

from __future__ import annotations

import argparse
import codecs
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moss_agent import model_ids, options
from moss_agent.commands import common
from moss_agent.errors import CheckpointError, ConfigError, MossError

# Published checkpoints per request kind.
DEFAULT_MODELS = {
    "tts": model_ids.TTS_MODEL_ID,
    "dialogue": model_ids.DIALOGUE_MODEL_ID,
    "voice_design": model_ids.VOICE_DESIGN_MODEL_ID,
    "sfx": model_ids.SOUND_EFFECT_MODEL_ID,
}
UNTRAINED_NOTICE = (
    "NOTE: --tiny uses tiny RANDOM, UNTRAINED models: the audio is loud noise, not speech; "
    "lower the volume before you play it. "
    "Drop --tiny for the real models."
)
# JSONL keys that are not request fields.
_EXTRA_KEYS = ("kind", "output")
_AUDIO_KEYS = ("reference", "continuation", "references")


def add_batch_options(parser: argparse.ArgumentParser, kind: str) -> None:
    model = DEFAULT_MODELS[kind]
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="many requests: one JSON object per line with the request fields (an optional "
        '"output" names its wav inside --output-dir; audio fields take paths relative to the file); '
        "the whole file is checked before any model loads",
    )
    io.add_argument(
        "--output", "-o", type=Path, default=None, help=f"wav for a single request (default {kind}.wav)"
    )
    io.add_argument(
        "--output-dir", type=Path, default=None, help="folder for the wavs of --jsonl (default .)"
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model, help=f"checkpoint folder or hub id (default {model})")
    group.add_argument(
        "--codec",
        default=None,
        help="MOSS-Audio-Tokenizer folder or hub id (default: the one the model names)",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random checkpoints made locally (offline trials; not speech)",
    )
    options.add_device_options(group)
    group.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help=f"pieces generated together, 1 to {MAX_BATCH_SIZE} (default 8)",
    )
    group.add_argument(
        "--max-chars",
        type=int,
        default=300,
        help="longest text piece, 8 to 2000; longer texts are split (default 300)",
    )
    group.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help=f"cap on each text piece's audio, at most {MAX_PIECE_SECONDS:g} (default: about 320 s)",
    )
    group.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="shortest audio of each text piece: the model may not end it sooner (default 0; 1 with --tiny)",
    )
    group.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the model card's sampling"
    )
    group.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------
# requests: the text argument or --jsonl lines, all checked before any model loads

# Sane ranges for the numeric fields (JSONL and options alike); anything outside is a mistake or an
# attack, never a longer result: the engine caps each piece's audio anyway.
MAX_TOKENS = 7500  # "tokens" hint: 12.5 Hz frames, 10 minutes
MAX_DURATION_S = 600.0  # sfx "duration_s", as SoundEffectRequest allows
MAX_PIECE_SECONDS = 600.0  # --max-seconds
MAX_BATCH_SIZE = 256  # --batch-size
MAX_CHARS_RANGE = (8, 2000)  # --max-chars: split_text needs 8; longer pieces only get cut
MAX_SEED = options.MAX_SEED  # --seed (batch k samples with seed + k)
MAX_JSONL_BYTES = 64 * 1024 * 1024
MAX_JSONL_LINE_BYTES = 1024 * 1024  # a long chapter of text fits; the engine splits it
MAX_JSONL_DEPTH = 3  # {"references": [..]} is the deepest a request goes


# Each request kind's fields (the dataclasses of engine.batch.KINDS; a test keeps the two equal) and
# whether they are required, so that a JSONL file is checked without importing torch.
REQUEST_FIELDS = {
    "tts": {"text": True, "reference": False, "tokens": False, "language": False, "continuation": False},
    "dialogue": {"script": True, "references": False, "continue_from_references": False, "normalize": False},
    "voice_design": {"instruction": True, "text": True},
    "sfx": {"description": True, "duration_s": False},
}


@dataclass
class _Item:
    """One request: its fields for the engine, where it came from (``file:line``, None for the
    command line) and the wav it goes to."""

    fields: dict[str, Any]
    where: str | None
    target: Path


def _text_field(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {_json_type(value)}"
    return None if value.strip() else "is empty; give some text"


def _path_field(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"must be the path of an audio file, got {_json_type(value)}"
    return None


def _paths_field(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of audio paths (null for a speaker not cloned), got {_json_type(value)}"
    if len(value) > 5:
        return f"lists {len(value)} clips; MOSS-TTSD takes at most 5 speakers"
    bad = [clip for clip in value if clip is not None and _path_field(clip)]
    return f"must hold audio paths or null, got {_json_type(bad[0])}" if bad else None


def _flag_field(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {_json_type(value)}"


def _tokens_field(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS:
        return (
            f"must be a whole number of 12.5 Hz frames from 1 to {MAX_TOKENS} (10 minutes), "
            f"got {_shown(value)}"
        )
    return None


def _duration_field(value: Any) -> str | None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 < value <= MAX_DURATION_S:
        return f"must be seconds in (0, {MAX_DURATION_S:g}], got {_shown(value)}"
    return None


# What a request field is called on the command line (a single request), for its errors.
FIELD_OPTIONS = {
    "text": "TEXT",
    "script": "SCRIPT",
    "description": "DESCRIPTION",
    "instruction": "--instruction",
    "language": "--language",
    "reference": "--reference",
    "references": "--reference",
    "tokens": "--tokens",
    "duration_s": "--duration",
    "continue_from_references": "--clone-only",
    "normalize": "--normalize",
}


# Each request field's check (None: the value is fine); null is allowed for optional fields.
_FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "text": _text_field,
    "script": _text_field,
    "instruction": _text_field,
    "description": _text_field,
    "language": _text_field,
    "reference": _path_field,
    "continuation": _path_field,
    "references": _paths_field,
    "continue_from_references": _flag_field,
    "normalize": _flag_field,
    "tokens": _tokens_field,
    "duration_s": _duration_field,
}


def _json_type(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = (
        json.dumps(value)
        if isinstance(value, int | float | str | bool) or value is None
        else _json_type(value)
    )
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(kind: str, fields: dict[str, Any], *, command_line: bool = False) -> list[str]:
    """Raise ConfigError naming the first field of a ``kind`` request that is missing, of the wrong
    type or out of range (see MAX_TOKENS, MAX_DURATION_S), or a request whose result cannot be what
    was meant; return warnings about a request that may not be. ``command_line``: the fields came
    from options, so the errors name the options (``--duration``) rather than the JSON fields."""
    for name, required in REQUEST_FIELDS[kind].items():
        value = fields.get(name)
        if value is None:
            if required:
                raise ConfigError(f'missing field "{name}"; a {kind} request needs it')
            continue
        problem = _FIELD_CHECKS[name](value)
        if problem:
            raise ConfigError(f"{FIELD_OPTIONS[name] if command_line else json.dumps(name)} {problem}")
    return _dialogue_warnings(fields, command_line) if kind == "dialogue" else []


_TURN_TAG = re.compile(r"\[S(\d+)\]")


def _dialogue_warnings(fields: dict[str, Any], command_line: bool) -> list[str]:
    """A dialogue continued from its references (the default) reads the script's first turns as
    what the reference clips say, and speaks only the turns after them: a script with no turn left
    over would give a fraction of a second of audio, so it is refused; first turns whose speakers
    are not the references' in order are a warning."""
    clips = fields.get("references") or []
    speakers = [k + 1 for k, clip in enumerate(clips) if clip is not None]
    if not speakers or fields.get("continue_from_references") is False:
        return []
    script = str(fields["script"])
    if fields.get("normalize"):
        script = re.sub(r"\[(\d+)\]", r"[S\1]", script)
    turns = [int(tag) for tag in _TURN_TAG.findall(script)]
    if fields.get("normalize"):  # the clean-up merges consecutive turns of one speaker
        turns = [tag for k, tag in enumerate(turns) if k == 0 or tag != turns[k - 1]]
    voices_only = "--clone-only" if command_line else '"continue_from_references": false'
    clips_named = f"{len(speakers)} --reference clip(s)" if command_line else f"{len(speakers)} reference clip(s)"
    layout = " ".join(f"[S{k}] <what clip {n} says>" for n, k in enumerate(speakers, start=1))
    if len(turns) <= len(speakers):
        raise ConfigError(
            f"the script has {len(turns)} turn(s) and there are {clips_named}: the clips' transcripts are "
            "expected first, so there is nothing new to say; "
            f"use {voices_only} to take the clips as voices only, or begin the script with the transcripts: "
            f"'{layout} [S1] new text ...'"
        )
    if turns[: len(speakers)] != speakers:
        first = " ".join(f"[S{k}]" for k in turns[: len(speakers)])
        return [
            f"the script begins {first}, but its first turns are read as the transcripts of the reference "
            f"clips in order ('{layout}'); if they are not, use {voices_only}"
        ]
    return []


def read_jsonl(path: Path, kind: str, outputs: _OutputFolder) -> list[_Item]:
    """The requests of a JSONL file, every line checked (shape, types, ranges, audio files present,
    outputs inside the output folder) before anything runs; errors are ``file:line: message``."""
    from moss_agent.wire import decode_json_object

    data = _read_bounded(path)
    allowed = set(REQUEST_FIELDS[kind]) | set(_EXTRA_KEYS)
    items = []
    for number, line in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = decode_json_object(
                line,
                what="the line",
                max_bytes=MAX_JSONL_LINE_BYTES,
                max_depth=MAX_JSONL_DEPTH,
                error=ConfigError,
            )
            unknown = sorted(set(item) - allowed)
            if unknown:
                raise ConfigError(
                    f"unknown field(s) {', '.join(_shown(name)[1:-1] for name in unknown)}; "
                    f"a {kind} request takes {', '.join(sorted(allowed))}"
                )
            line_kind = item.pop("kind", kind)
            if not isinstance(line_kind, str) or line_kind.replace("-", "_") != kind:
                raise ConfigError(f"kind {_shown(line_kind)} does not belong in a {kind} file")
            target = outputs.claim(item.pop("output", None), f"{len(items):04d}.wav", where)
            for warning in check_fields(kind, item):
                print(f"warning: {where}: {warning}", file=sys.stderr)
            for key in _AUDIO_KEYS:
                if item.get(key) is not None:
                    item[key] = _audio_paths(item[key], path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        items.append(_Item(item, where, target))
    if not items:
        raise ConfigError(f"{path} holds no requests")
    return items


def _read_bounded(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_JSONL_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_JSONL_BYTES:
        raise ConfigError(
            f"{path} is larger than {MAX_JSONL_BYTES // 2**20} MiB; split it into several files"
        )
    return data


def _audio_paths(value: str | list[str | None], base: Path | None) -> str | list[str | None]:
    """Audio paths relative to ``base`` (the JSONL file's folder; None: the working folder), each
    checked to be a file now rather than after the models load."""
    if isinstance(value, list):
        return [None if clip is None else _audio_path(clip, base) for clip in value]
    return _audio_path(value, base)


def _audio_path(value: str, base: Path | None) -> str:
    file = (base or Path()) / Path(value).expanduser()
    if not file.is_file():
        hint = "; paths are relative to the JSONL file" if base is not None else ""
        raise ConfigError(f"audio file {value} not found (looked for {file.absolute()}){hint}")
    return str(file)


class _OutputFolder:
    """Where each JSONL request's wav goes: always inside ``--output-dir``, never twice the same file.

    A name is refused if it is absolute, has a ``..`` part, or resolves (through symlinks already in
    the folder) to somewhere outside it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder.resolve()
        self._claimed: dict[Path, str] = {}

    def claim(self, name: Any, default: str, where: str) -> Path:
        """The path of a line's wav: ``name`` (its "output") or ``default``; ConfigError if refused."""
        if name is None:
            name = default
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f'"output" must be a file name inside --output-dir, got {_shown(name)}')
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ConfigError(
                f'"output" {name!r} leaves --output-dir {self.folder}; give a name relative to it, without ".."'
            )
        target = self.folder / relative
        resolved = self.check_inside(target)
        if resolved.is_dir():
            raise ConfigError(f'"output" {name!r} is a folder; name a wav file')
        if resolved in self._claimed:
            raise ConfigError(
                f"the output {name!r} is also the output of {self._claimed[resolved]}; give each line its own "
                '"output"'
            )
        self._claimed[resolved] = where
        return target

    def create(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create --output-dir {self.folder}: {exc.strerror or exc}") from exc

    def check_inside(self, target: Path) -> Path:
        """``target`` resolved; ConfigError if a symlink takes it outside the folder."""
        resolved = target.resolve()
        if not resolved.is_relative_to(self.root):
            raise ConfigError(
                f"{target} resolves to {resolved}, outside --output-dir {self.folder} (a symlink?); "
                "outputs stay inside the folder"
            )
        return resolved


def build_batch_engine(args: argparse.Namespace) -> Any:
    from moss_agent.engine.registry import ModelRegistry

    model, codec = args.model, args.codec
    if args.tiny:
        print(UNTRAINED_NOTICE, file=sys.stderr)
        model = common.ensure_tiny_batch_checkpoint()
        codec = common.ensure_tiny_checkpoints()[1]
    engine_options: dict[str, Any] = {"max_chars": args.max_chars}
    if args.max_seconds is not None:
        engine_options["max_new_tokens"] = round(args.max_seconds * 12.5) + 40  # + the flush and end rows
    registry = ModelRegistry(device=args.device, dtype=args.dtype)
    registry.tts(model)  # loaded first, so a checkpoint error after it is the codec's
    try:
        return registry.batch_engine(model, codec, **engine_options)
    except CheckpointError as exc:  # the codec named by the model's processor_config.json too
        exc.option = exc.option or "--codec"
        raise


def check_options(args: argparse.Namespace) -> None:
    """The numeric options in their documented ranges, before anything loads."""
    low, high = MAX_CHARS_RANGE
    checks = [
        (
            "--batch-size",
            args.batch_size,
            1 <= args.batch_size <= MAX_BATCH_SIZE,
            f"from 1 to {MAX_BATCH_SIZE}",
        ),
        ("--max-chars", args.max_chars, low <= args.max_chars <= high, f"from {low} to {high}"),
        (
            "--max-seconds",
            args.max_seconds,
            args.max_seconds is None or 0 < args.max_seconds <= MAX_PIECE_SECONDS,  # False for NaN
            f"seconds in (0, {MAX_PIECE_SECONDS:g}]",
        ),
        ("--seed", args.seed, args.seed is None or 0 <= args.seed <= MAX_SEED, f"from 0 to {MAX_SEED}"),
    ]
    for option, value, ok, wanted in checks:
        if not ok:
            raise ConfigError(f"{option} must be {wanted}, got {value}")


def run_batch(
    args: argparse.Namespace, kind: str, single: Callable[[argparse.Namespace], dict[str, Any]]
) -> int:
    """Build the requests (the text argument, or --jsonl), check them all, generate, write one wav
    per request."""
    from moss_agent.audio import write_wav
    from moss_agent.options import min_frames

    check_options(args)
    shortest = min_frames(args)  # --min-seconds (1 s with --tiny: the random models may stop at once)
    outputs = None
    if args.jsonl is not None:
        if args.output is not None:
            raise ConfigError("--output is for one request; with --jsonl use --output-dir")
        outputs = _OutputFolder(args.output_dir or Path("."))
        items = read_jsonl(args.jsonl, kind, outputs)
    else:
        if args.output_dir is not None:
            raise ConfigError("--output-dir is for --jsonl; for one request use --output")
        fields = single(args)
        for warning in check_fields(kind, fields, command_line=True):
            print(f"warning: {warning}", file=sys.stderr)
        for key in _AUDIO_KEYS:
            if fields.get(key) is not None:
                fields[key] = _audio_paths(fields[key], None)
        target = args.output or Path(f"{kind.replace('_', '-')}.wav")
        common.check_output_file(target, "--output")
        items = [_Item(fields, None, target)]
    engine = build_batch_engine(args)
    requests = []
    for item in items:
        try:
            requests.append(engine.request(kind, **item.fields))
        except MossError as exc:
            raise ConfigError(f"{item.where}: {exc}" if item.where else str(exc)) from exc
    if outputs is not None:
        outputs.create()
    params = None
    if args.greedy or shortest:
        params = engine.default_params(kind)
        params = replace(params.greedy() if args.greedy else params, min_frames=shortest)
    unfinished = 0
    for result in engine.stream(
        requests, batch_size=args.batch_size, progress=not args.quiet, params=params, seed=args.seed
    ):
        target = items[result.index].target
        if not len(result.pcm):  # the model ended the request at once: an empty result, not a failure
            print(f"no audio for {target} (the model ended at once; --min-seconds sets a shortest length); "
                  "nothing written", file=sys.stderr)
            continue
        if outputs is not None:
            outputs.check_inside(target)  # a symlink planted while the models ran
            target.parent.mkdir(parents=True, exist_ok=True)  # an "output" in a subfolder
        write_wav(target, result.pcm, result.sample_rate)
        unfinished += not result.finished
        note = "" if result.finished else " (cut at the length limit)"
        print(f"wrote {target} ({result.duration_s:.2f} s of audio){note}")
    if unfinished:
        print(f"{unfinished} request(s) hit the length limit before ending", file=sys.stderr)
    return 0


def read_text(value: str) -> str:
    """The text argument; '-' reads standard input."""
    return sys.stdin.read() if value == "-" else value
