"""Which model ``--model`` names: an open_clip model name, or a model-config JSON checked before
open_clip builds anything from it (sizes in range, a model that fits in this machine's memory).
Imports neither torch nor open_clip at import time."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from raml.errors import OptionError

DEFAULT_MODEL = "ViT-B-16"  # RAML's CLIP (README, docs/method.md#the-21-crop-pyramid)
DEFAULT_PRETRAINED = "openai"
WINCLIP_MODEL = "ViT-B-16-plus-240"  # the WinCLIP baseline's CLIP: the WinCLIP paper's backbone
WINCLIP_PRETRAINED = "laion400m_e31"

# The sizes a model config may give, checked before open_clip builds anything: a typo (or a
# corrupt file) must not make it allocate a model of 10^12 parameters. Wide enough for every
# open_clip ViT (ViT-bigG-14: width 1664, 48 layers; context 77; vocabulary 49,408).
CONFIG_LIMITS = {
    "embed_dim": (1, 16384),
    "vision_cfg": {
        "image_size": (8, 4096),
        "layers": (1, 128),
        "width": (8, 16384),
        "patch_size": (1, 1024),
        "head_width": (1, 4096),
    },
    "text_cfg": {
        "context_length": (1, 1024),
        "vocab_size": (1, 1_000_000),
        "width": (8, 16384),
        "heads": (1, 256),
        "layers": (1, 128),
    },
}


REQUIRED = {("", "embed_dim"), ("vision_cfg.", "image_size")}  # what RAML itself reads from a config


def check_model_config(path: Path) -> dict:
    """The model config JSON at ``path``, or a ``UserError`` naming the file and what is wrong: not
    UTF-8 JSON, not an object, no ``embed_dim``/``vision_cfg``/``text_cfg``, or a size of
    ``CONFIG_LIMITS`` that is not a whole number in range."""

    def fail(problem: str):
        raise OptionError(
            "--model",
            f"{path}: {problem}. An open_clip model config is a JSON object with embed_dim, "
            'vision_cfg and text_cfg (e.g. {"embed_dim": 512, "vision_cfg": {"image_size": 224, '
            '...}, "text_cfg": {...}})',
        )

    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        fail(f"not UTF-8 text ({err.reason} at byte {err.start})")
    except json.JSONDecodeError as err:
        fail(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")
    if not isinstance(config, dict):
        fail(f"a JSON {type(config).__name__}, not an object")

    def check(values: dict, limits: dict, where: str):
        for key, limit in limits.items():
            if isinstance(limit, dict):
                if not isinstance(values.get(key), dict):
                    fail(f"{where}{key} is missing or not an object")
                check(values[key], limit, f"{where}{key}.")
            elif (key in values and values[key] is not None) or (where, key) in REQUIRED:  # null: the default
                value = values.get(key)
                low, high = limit
                # lists: a ResNet's layers per stage, an image size as [height, width]
                numbers = (
                    value
                    if isinstance(value, list) and where == "vision_cfg." and key in ("layers", "image_size")
                    else [value]
                )
                if not numbers or any(
                    isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high for n in numbers
                ):
                    fail(f"{where}{key} is {value!r}; expected a whole number from {low} to {high}")

    check(config, CONFIG_LIMITS, "")
    need, have = 4 * config_parameters(config), physical_memory()
    if have and need > have:
        fail(
            f"its model would have about {need / 4e9:.1f} G parameters ({need / 1e9:.0f} GB in float32), more than "
            f"this machine's memory ({have / 1e9:.0f} GB)"
        )
    return config


def _register_checked_copy(path: Path, config: dict) -> None:
    """Register ``config`` with open_clip under ``path``'s stem, from a copy in a directory of this
    process's own: open_clip re-reads every file it was ever given each time another is added, so
    a user's file that changes or breaks later (an edited config, a test's scratch file) must not
    be one of them."""
    global _CONFIG_COPIES
    import open_clip

    if _CONFIG_COPIES is None:
        _CONFIG_COPIES = Path(tempfile.mkdtemp(prefix="raml-model-configs-"))
        atexit.register(shutil.rmtree, _CONFIG_COPIES, ignore_errors=True)
    copy = _CONFIG_COPIES / path.name
    copy.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(copy)


_CONFIG_COPIES: Path | None = None  # see _register_checked_copy


def config_parameters(config: dict) -> int:
    """About how many parameters a ViT CLIP of ``config`` has (12·width² per transformer block,
    plus patch and token embeddings): enough to refuse a size no machine here could build."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    width = vision.get("width") or 768  # open_clip's defaults where a value is left out
    layers = sum(vision["layers"]) if isinstance(vision.get("layers"), list) else vision.get("layers") or 12
    patch = vision.get("patch_size") or 16
    side = max(vision["image_size"]) if isinstance(vision["image_size"], list) else vision["image_size"]
    text_width = text.get("width") or 512
    return (
        layers * 12 * width**2
        + 3 * patch**2 * width
        + (side // patch) ** 2 * width
        + (text.get("layers") or 12) * 12 * text_width**2
        + (text.get("vocab_size") or 49408) * text_width
    )


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_name(model: str) -> str:
    """Register a config JSON with open_clip if ``model`` is a path (checked first:
    ``check_model_config``); return the name to create."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such model-config file")
        _register_checked_copy(path, check_model_config(path))
        return path.stem
    if model not in open_clip.list_models():
        raise OptionError(
            "--model",
            f"{model!r} is not an open_clip model name nor a config .json (e.g. "
            f"{DEFAULT_MODEL}, ViT-B-16-plus-240, ViT-L-14)",
        )
    return model


@functools.cache  # raml.toml checks a top-level --model once per command that has it
def model_problem(model: str) -> str | None:
    """Why ``--model`` cannot name a model, found without importing open_clip (the command line
    checks it before any work): a missing or invalid config JSON, or a name of no config open_clip
    ships. None when it can (or when open_clip's configs cannot be looked at without importing it)."""
    if not model.strip():
        return "empty: give an open_clip model name (e.g. ViT-B-16) or a model-config .json"
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            return f"{model}: no such model-config file"
        try:
            check_model_config(path)
        except OptionError as err:
            return err.reason
        return None
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    if not (Path(spec.submodule_search_locations[0]) / "model_configs" / f"{model}.json").is_file():
        return (
            f"{model!r} is not an open_clip model name nor a config .json (e.g. {DEFAULT_MODEL}, "
            "ViT-B-16-plus-240, ViT-L-14)"
        )
    return None
