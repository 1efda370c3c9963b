"""One model of each timm family the docs name (docs/models.md), for the zoo test and ``benchmarks/zoo_timing.py``.

Each is built with random weights at its native input size (timm's
``pretrained_cfg``). ``layouts``: how the default layers read (kind: count),
as the layouts table in docs/models.md lists them; ``lattice``: whether the default
layers have a measured lattice on rot90 ("all", "some" or "none"), so that a
model whose lattices silently vanish is noticed.
"""
TRANSFORMS = ["rot90", "translate32,0"]

ZOO: dict[str, dict] = {
    "resnet18": {"family": "resnet", "layouts": {"NCHW": 5}, "lattice": "all"},
    "tf_efficientnet_lite0": {"family": "efficientnet/lite", "layouts": {"NCHW": 5}, "lattice": "all"},
    "mobilenetv3_small_100": {"family": "mobilenetv3", "layouts": {"NCHW": 5}, "lattice": "some"},
    "convnext_atto": {"family": "convnext", "layouts": {"NCHW": 4}, "lattice": "some"},
    "regnetx_002": {"family": "regnet", "layouts": {"NCHW": 5}, "lattice": "all"},
    "repvgg_a0": {"family": "repvgg", "layouts": {"NCHW": 5}, "lattice": "all"},
    "hrnet_w18_small": {"family": "hrnet", "layouts": {"NCHW": 3}, "lattice": "all"},
    "selecsls42b": {"family": "selecsls", "layouts": {"NCHW": 6}, "lattice": "all"},
    "inception_v3": {"family": "inception", "layouts": {"NCHW": 5}, "lattice": "all"},
    "vit_tiny_patch16_224": {"family": "vit", "layouts": {"NLC": 12}, "lattice": "none"},
    "deit_tiny_distilled_patch16_224": {"family": "deit (distilled)", "layouts": {"NLC": 12}, "lattice": "none"},
    "swin_tiny_patch4_window7_224": {"family": "swin", "layouts": {"NHWC": 4}, "lattice": "none"},
    "maxvit_tiny_rw_224": {"family": "maxvit", "layouts": {"NCHW": 5}, "lattice": "some"},
    "levit_128s": {"family": "levit", "layouts": {"NLC": 3}, "lattice": "some"},
    "efficientformer_l1": {"family": "efficientformer", "layouts": {"NCHW": 3, "NLC": 1}, "lattice": "some"},
    "mobilevit_xxs": {"family": "mobilevit", "layouts": {"NCHW": 5}, "lattice": "some"},
}

# --layers all on two small models, one convolutional and one transformer
ALL_LAYERS = ["mobilenetv3_small_100", "levit_128s"]
