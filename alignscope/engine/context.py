"""The set-up every run shares: :class:`RunContext`.

``analyze``, ``explain`` and ``benchmark`` all start the same way: load the model of a
:class:`~alignscope.model.options.ModelOptions` onto its device (refusing NaN/inf weights),
probe its layers at the model's input size, select the asked ones, measure their sampling
lattices, and resolve the transforms of a :class:`~alignscope.inputs.options.PairOptions`
against the deepest selected stride. The context then hands out the image stream, the pair
feeder, the output head and the run's metadata, so no entry point repeats that set-up.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..errors import ModelError
from ..geometry.transforms import Transform
from ..inputs.images import ImageStream
from ..inputs.options import PairOptions
from ..inputs.pairs import PairFeeder
from ..measure.prediction import Head, find_head
from ..model.build import DataConfig
from ..model.capture import LayerInfo, default_layer_rule, probe_layers, select_layers
from ..model.lattice_probe import attach_lattices
from ..model.options import ModelOptions
from ..model.precision import feed_in_model_dtype
from ..report.verdicts import no_lattice_sentence
from ..runtime.allocator import release_free_memory

log = logging.getLogger("alignscope")


def refuse_nonfinite_weights(module: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf: every number it gave would be meaningless."""
    bad = [name for name, tensor in (*module.named_parameters(), *module.named_buffers())
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ModelError(f"the model's weights hold NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}); "
                         "check the checkpoint or the model's initialisation")


@dataclass
class RunContext:
    """A loaded, probed model with its selected layers and transforms, and the options they came from.

    ``layers`` are in execution order, each with its measured lattice where it has one
    (``no_lattice``: layer -> why not); ``skipped_layers`` were asked for but cannot be compared
    (their reasons are in ``LayerInfo.reason``). ``setup_seconds``: wall time of :meth:`open`.
    """

    model: nn.Module
    cfg: DataConfig
    layers: list[LayerInfo]
    skipped_layers: list[LayerInfo]
    transforms: list[Transform]
    options: ModelOptions
    pairs: PairOptions
    device: torch.device
    no_lattice: dict[str, str] = field(default_factory=dict)
    setup_seconds: float = 0.0
    layer_rule: str = ""  # how the default layers were chosen (or that they were asked for)

    @classmethod
    def open(cls, options: ModelOptions, pairs: PairOptions, device: torch.device) -> "RunContext":
        """Load the model of ``options`` onto ``device``, probe it, choose its layers and their transforms."""
        started = time.perf_counter()
        module, cfg = options.load()
        refuse_nonfinite_weights(module)
        module = module.to(device)
        feed_in_model_dtype(module)  # a float16 / bfloat16 model takes the float32 images too (removed with the run)
        probed = probe_layers(module, cfg.input_size, device)
        chosen, skipped = select_layers(probed, options.layers)
        no_lattice = attach_lattices(module, chosen, cfg.input_size, device)
        release_free_memory()  # the probes' transient memory, before the analysis's batches
        if no_lattice:
            log.warning("%s", no_lattice_sentence(no_lattice))
        deepest = max(layer.stride or 1 for layer in chosen)
        transforms = pairs.resolve_transforms(deepest)
        rule = default_layer_rule(probed) if options.layers is None else "asked for (--layers)"
        return cls(module, cfg, chosen, skipped, transforms, options, pairs, device, no_lattice,
                   time.perf_counter() - started, rule)

    def stream(self) -> ImageStream:
        """The images of :attr:`pairs`, prepared for this model (at least two)."""
        return self.pairs.stream(self.cfg, self.device)

    def feeder(self, **kwargs) -> PairFeeder:
        """The pair feeder for these layers and transforms (``kwargs``: ``timer``, ``amp``, ``channels_last``)."""
        return self.pairs.feeder(self.layers, self.transforms, self.cfg, self.device, **kwargs)

    def output_head(self, wanted: bool) -> Head:
        """The model's classifier head as the probe finds it, or why the output row is not measured (one line)."""
        head = find_head(self.model, self.cfg.input_size, self.device) if wanted else Head(
            False, reason="skipped on request (--no-output)")
        if not head.measured:
            log.info("no prediction row: %s", head.reason)
        return head

    def metadata(self, stream: ImageStream, setup_seconds: float, loop_seconds: float) -> dict:
        """``run.json``'s description of this run: model, layers, transforms, images, timings, versions, machine."""
        import timm

        pairs = self.pairs.as_json()
        return {
            "alignscope_version": __version__,
            "model": self.cfg.model_name,
            "model_options": self.options.as_json(),
            "weights": self.cfg.weights,
            "pretrained": self.cfg.pretrained,
            "data_config": {k: v for k, v in self.cfg.as_dict().items() if k not in ("extra",)},
            "layers": [layer.name for layer in self.layers],
            "default_layers": self.layer_rule,
            "layers_skipped": [{"layer": layer.name, "reason": layer.reason} for layer in self.skipped_layers],
            "no_lattice": dict(self.no_lattice),
            "layer_layouts": {layer.name: {"layout": str(layer.layout), "evidence": layer.layout.evidence}
                              for layer in self.layers},
            "transforms": [t.spec for t in self.transforms],
            **{k: pairs[k] for k in ("mask", "batch_size", "seed", "max_images", "images_source")},
            "images_used": list(stream.used),
            "images_skipped": [{"path": p, "reason": r} for p, r in [*stream.ignored, *stream.skipped]],
            "device": str(self.device),
            "timings_seconds": {"setup": round(setup_seconds, 3), "analysis": round(loop_seconds, 3)},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                         "numpy": np.__version__, "pandas": pd.__version__},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        }
