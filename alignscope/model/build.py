"""Model loading: timm names, offline weights, local checkpoints, plain modules.

Every model comes with a :class:`DataConfig` that says how images must be
prepared for it. For timm models it is taken from the model's
``pretrained_cfg``; for an arbitrary ``nn.Module`` the caller supplies it.
"""
from __future__ import annotations

import difflib
import os
import pickle
import socket
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .offline_weights import installed_offline_weights, offline_weights

DEFAULT_MODEL = "tf_efficientnet_lite0"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class DataConfig:
    """How images are prepared for a model, and where its weights came from.

    ``input_size`` is (channels, height, width); ``mean``/``std`` are per RGB
    channel for pixel values in [0, 1]; preprocessing resizes the shorter side
    to ``input_size / crop_pct`` with ``interpolation`` and centre-crops.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    model_name: str = "custom"
    weights: str = "as given"
    pretrained: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timm_data_config(model: nn.Module, name: str, weights: str, pretrained: bool) -> DataConfig:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return DataConfig(
        input_size=tuple(cfg["input_size"]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        crop_mode=str(cfg.get("crop_mode", "center")),
        model_name=name,
        weights=weights,
        pretrained=pretrained,
    )


def suggest_model_names(name: str, limit: int = 5) -> list[str]:
    """The timm model names closest to ``name`` (substring matches first)."""
    import timm

    names = timm.list_models()
    contained = timm.list_models(f"*{name}*") if name else []
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.5)
    ordered = list(dict.fromkeys(close + contained))
    return ordered[:limit]


_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy format's pickle protocol byte


def _require_torch_file(path: Path) -> None:
    """Refuse a file that is neither format torch.save writes, so a text or image file is not called a pickle."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith(_TORCH_FILE_MAGIC):
        raise ModelError(
            f"{path} is not a torch checkpoint (torch.save writes a zip archive) nor a safetensors file; "
            "pass a .pth/.pt saved with torch.save(model.state_dict(), ...) or a .safetensors file to --weights")


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never executing pickled code.

    Torch files are read with ``weights_only=True``. A ``state_dict`` or
    ``model`` wrapper and a ``module.`` prefix (DataParallel) are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}; pass an existing .pth/.pt/.safetensors file to --weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises several types for bad headers
            raise ModelError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    else:
        _require_torch_file(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"refusing to load {path}: it holds pickled objects beyond tensors, which could run code; "
                "save a plain state dict (torch.save(model.state_dict(), ...)) or use .safetensors"
            ) from exc
        except Exception as exc:
            raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly; a mismatch becomes a one-line ModelError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} of wrong shape (e.g. {k!r}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ModelError(f"weights from {source} do not fit the model: " + ", ".join(parts))
    model.load_state_dict(state)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host resolves, answered within ``timeout`` seconds.

    timm fetches pretrained weights from there and retries for about a minute
    when it cannot; asking first lets alignscope fail at once offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from urllib.parse import urlparse

        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
    except Exception:
        return False
    if not host:
        return False
    result: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def cached_hub_checkpoint(name: str) -> Path | None:
    """The local Hugging Face cache file holding timm's weights for ``name``, if any."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _offline_way_out(name: str) -> str:
    available = ", ".join(entry.name for entry in installed_offline_weights()) or "none"
    return (
        f"pretrained weights for {name!r} are not on this machine and the model hub cannot be reached; "
        f"use --weights FILE (a local .pth/.pt/.safetensors checkpoint), --no-pretrained (random weights), "
        f"or a model with offline weights (alignscope models: {available})"
    )


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = "auto",
    pretrained: bool = True,
) -> tuple[nn.Module, DataConfig]:
    """Create timm model ``name`` in eval mode, with weights, and its data config.

    ``weights``: ``"auto"`` (offline registry first, then timm's hub weights or
    the local hub cache) or a path to a checkpoint. ``pretrained=False`` keeps
    timm's random initialisation (reports say so).
    """
    import timm

    if not timm.is_model(name):
        suggestions = suggest_model_names(name)
        hint = f"; closest timm names: {', '.join(suggestions)}" if suggestions else ""
        raise ModelError(f"unknown model {name!r}{hint} (alignscope models lists the ones ready offline)")
    model = timm.create_model(name, pretrained=False)
    if weights not in (None, "auto"):
        path = Path(weights)
        load_state_dict_checked(model, load_checkpoint(path), str(path))
        source, is_pretrained = f"file {path}", True
    elif not pretrained:
        source, is_pretrained = "random init (not pretrained)", False
    elif (entry := offline_weights(name)) is not None and entry.is_installed():
        load_state_dict_checked(model, entry.load_state_dict(), entry.description)
        source, is_pretrained = entry.description, True
    else:
        cached = cached_hub_checkpoint(name)
        if cached is not None:
            load_state_dict_checked(model, load_checkpoint(cached), f"hub cache {cached}")
            source, is_pretrained = f"timm hub weights (cache {cached})", True
        elif not hub_reachable():
            raise ModelError(_offline_way_out(name))
        else:
            try:
                model = timm.create_model(name, pretrained=True)
            except Exception as exc:
                raise ModelError(f"{_offline_way_out(name)} (hub said: {str(exc).splitlines()[0][:160]})") from exc
            source, is_pretrained = "timm hub weights", True
    model.eval()
    return model, _timm_data_config(model, name, source, is_pretrained)


def data_config_for_module(
    model: nn.Module,
    input_size: Sequence[int],
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    name: str | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    pretrained: bool = True,
) -> DataConfig:
    """A DataConfig for an arbitrary module; ``input_size`` is (C, H, W) or (H, W).

    ``pretrained`` says whether the module's weights are trained (reports flag random ones).
    """
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        size = (3,) + size
    if len(size) != 3:
        raise ModelError(f"input_size must be (C, H, W) or (H, W), got {tuple(input_size)}")
    return DataConfig(
        input_size=size,  # type: ignore[arg-type]
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        interpolation=interpolation,
        crop_pct=crop_pct,
        model_name=name or type(model).__name__,
        weights="as given",
        pretrained=pretrained,
    )


def offline_model_table() -> list[dict[str, str]]:
    """Models whose weights load on this machine now: the offline registry and the hub cache."""
    rows = [{"model": e.name, "weights": e.description} for e in installed_offline_weights()]
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_id.startswith("timm/"):
                arch = repo.repo_id.split("/", 1)[1].split(".")[0]
                rows.append({"model": arch, "weights": f"hub cache ({repo.repo_id})"})
    except Exception:
        pass  # no cache directory yet
    return rows
