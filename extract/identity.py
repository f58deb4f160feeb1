"""Which backbone encodes the features, known before the model is built, and without building it.

``backbone_identity`` turns the backbone options (``--model``, ``--pretrained``, ``--weights``,
``--random-weights``, and the engine's precision) into a ``BackboneIdentity``: the model's name,
the SHA-256 of its resolved open_clip config (the architecture by content, for a config JSON and a
built-in name alike), the weights id, input size, embedding size, mean/std and precision. These
are the backbone fields of the cache fingerprint. ``load_backbone`` builds the model from the same
resolution (``resolve_backbone``) and checks that the model it built agrees, so the fingerprint
that decides whether a cache needs work and the one of the features written cannot differ.

Resolving imports open_clip (seconds) and the id of a weights file is its SHA-256 (seconds to read
ViT-B/16's 600 MB). Both results are memoised in ``user_cache_root()/identity``, keyed by all they
derive from: the bytes of the config file, the open_clip version and the pretrained tag; for a
weights file its path, size and modification time (the rule ``make`` and ``rsync`` use). A re-run
that finds nothing to encode therefore neither imports open_clip nor reads the weights. This
module imports neither torch nor open_clip at import time, for the same reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, fields
from pathlib import Path

from raml.cache.files import atomic_write_text, user_cache_root
from raml.errors import OptionError, UserError
from raml.extract.model_config import DEFAULT_MODEL, DEFAULT_PRETRAINED, model_name

RANDOM_WEIGHTS_SEED = 0  # random weights are seeded so that a resumed run encodes like the first
TINY_TEST_CONFIG = Path(__file__).with_name("model_configs") / "raml-tiny-test.json"
# Bump when ``resolve_backbone`` changes what it computes: older memo entries are then not used.
IDENTITY_MEMO_VERSION = 2


class WeightsUnavailableError(UserError):
    """The CLIP weights asked for could not be loaded (offline, wrong path, unknown tag)."""


@dataclass(frozen=True)
class BackboneIdentity:
    """What the cache fingerprint records about the image encoder (``cache.FINGERPRINT_KEYS``)."""

    name: str  # open_clip model name; a config JSON's file stem
    model_config: str  # "sha256:<hex>" of the resolved open_clip model config (canonical JSON)
    weights: str  # "openai" (a tag), "sha256:<hex>" of a weights file, or "random(seed=0)"
    random_weights: bool
    input_size: int
    embed_dim: int
    mean: tuple
    std: tuple
    precision: str = "fp32"  # the image encoder's numeric precision ("int8": a quantised encoder)

    def fingerprint_fields(self) -> dict:
        """The keyword arguments of ``cache.fingerprint`` that describe the backbone."""
        return {
            "backbone": self.name,
            "model_config": self.model_config,
            "weights": self.weights,
            "random_weights": self.random_weights,
            "input_size": self.input_size,
            "embed_dim": self.embed_dim,
            "mean": self.mean,
            "std": self.std,
            "precision": self.precision,
        }


def identity_of(backbone) -> BackboneIdentity:
    """The identity a loaded backbone (``ClipBackbone`` or any object with its fields) carries."""
    return BackboneIdentity(**{f.name: getattr(backbone, f.name) for f in fields(BackboneIdentity)})


@dataclass(frozen=True)
class ResolvedBackbone:
    """How to build a backbone with open_clip, and its identity."""

    identity: BackboneIdentity
    open_clip_name: str  # what ``open_clip.create_model`` takes (a config JSON is registered under its stem)
    source: str | None  # ``create_model``'s ``pretrained``: a tag, a weights file, or None (random)
    quick_gelu: bool  # ``create_model``'s ``force_quick_gelu``: what the tag's weights were trained with


def backbone_identity(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    weights: str | None = None,
    random_weights: bool = False,
    precision: str = "fp32",
) -> BackboneIdentity:
    """The identity of the backbone these options load, from the memo when it holds it (no
    open_clip import), else from ``resolve_backbone``. ``precision`` is the engine's
    ("fp32" for torch and ONNX float32, "int8" for a quantised encoder)."""
    key = _identity_key(model, pretrained, weights, random_weights)
    found = _memo_read("identity", key) if key is not None else None
    if found is not None:
        return BackboneIdentity(
            **{**found, "mean": tuple(found["mean"]), "std": tuple(found["std"]), "precision": precision}
        )
    return resolve_backbone(model, pretrained, weights, random_weights, precision).identity


def resolve_backbone(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    weights: str | None = None,
    random_weights: bool = False,
    precision: str = "fp32",
) -> ResolvedBackbone:
    """Resolve the options with open_clip, as ``open_clip.create_model`` will, without building
    the model; memoise the identity for ``backbone_identity``.

    Exactly one weights source is used: ``random_weights`` (seeded), else ``weights`` (a file, taken
    to hold the ``pretrained`` tag's weights), else the ``pretrained`` tag. The config is open_clip's, with ``quick_gelu`` set when the tag's
    weights were trained with it (OpenAI's were); mean and std are the tag's, else open_clip's
    defaults.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    name = model_name(model)
    config = open_clip.get_model_config(name)
    if config is None:
        raise UserError(f"--model {model}: not an open_clip model config (it needs embed_dim, vision_cfg and text_cfg)")
    if random_weights:
        weights_id, source, tag_config = f"random(seed={RANDOM_WEIGHTS_SEED})", None, {}
    elif weights:
        # A weights file is a local copy of the ``pretrained`` tag's weights (default: OpenAI's): the
        # tag still says how to build the model for them (OpenAI's need QuickGELU) and how to
        # normalise. A file of no known tag (``pretrained`` None or unknown) gets open_clip's config as is.
        weights_id, source = "sha256:" + weights_sha256(weights), str(weights)
        tag_config = (open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}) or {}
    else:
        tag_config = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        if not tag_config:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise OptionError(
                "--pretrained",
                f"{pretrained!r} is not a pretrained tag of {name} (its tags: {tags}). "
                "A weights file goes to --weights FILE.",
            )
        weights_id, source = pretrained, pretrained
    quick_gelu = bool(tag_config.get("quick_gelu", False))
    if quick_gelu:
        config["quick_gelu"] = True
    image_size = config["vision_cfg"]["image_size"]
    sides = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    if sides[0] != sides[1]:
        raise UserError(f"--model {model}: input {sides[0]}x{sides[1]} px; the crop pyramid needs a square input")
    preprocess = merge_preprocess_dict(PreprocessCfg(), tag_config)
    identity = BackboneIdentity(
        name=name,
        model_config=config_sha256(config),
        weights=weights_id,
        random_weights=bool(random_weights),
        input_size=int(sides[0]),
        embed_dim=int(config["embed_dim"]),
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        precision=precision,
    )
    key = _identity_key(model, pretrained, weights, random_weights)
    if key is not None:
        _memo_write(
            "identity", key, {f.name: getattr(identity, f.name) for f in fields(identity) if f.name != "precision"}
        )
    return ResolvedBackbone(identity=identity, open_clip_name=name, source=source, quick_gelu=quick_gelu)


def config_sha256(config: dict) -> str:
    """ "sha256:<hex>" of a model config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path) -> str:
    """SHA-256 of a weights file, memoised by (real path, size, modification time)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights {path}: no such file")
    stat = path.stat()
    key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    found = _memo_read("file-sha256", key)
    if found is None:
        found = file_sha256(path)
        _memo_write("file-sha256", key, found)
    return found


def _identity_key(model: str, pretrained, weights, random_weights: bool) -> dict | None:
    """Everything ``resolve_backbone``'s result derives from, or None where that cannot be known
    without open_clip (a name that is not one of open_clip's bundled config files)."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such model-config file")
        config_file = path
    else:
        spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        config_file = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{model}.json"
        if not config_file.is_file():
            return None
    if random_weights:
        weights_key = ["random", RANDOM_WEIGHTS_SEED]
    elif weights:
        weights_key = ["file", weights_sha256(weights), pretrained]  # the tag the file's weights are of
    else:
        weights_key = ["tag", pretrained]
    return {
        "memo_version": IDENTITY_MEMO_VERSION,
        "open_clip": importlib.metadata.version("open_clip_torch"),
        "model": path.stem if path.suffix == ".json" else model,
        "config_sha256": file_sha256(config_file),
        "weights": weights_key,
    }


def _memo_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    return user_cache_root() / "identity" / f"{kind}-{digest}.json"


def _memo_read(kind: str, key: dict):
    try:
        entry = json.loads(_memo_path(kind, key).read_text())
    except (OSError, ValueError):  # absent, unreadable or damaged: recompute
        return None
    return entry["value"] if isinstance(entry, dict) and entry.get("key") == key else None


def _memo_write(kind: str, key: dict, value) -> None:
    path = _memo_path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "value": value}, indent=1))
    except OSError:
        pass  # a read-only or full cache directory only costs the next run the time to recompute
