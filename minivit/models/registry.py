"""The official model names, their configs, and the spellings users type for them.

Mirrors `vit_jax/configs/models.py` of google-research/vision_transformer (`MODEL_CONFIGS` and
`AUGREG_CONFIGS`): every name the official code registers for an image model (LiT and `testing`
aside), with the same fields and dropout rates. `param_shapes` derives every checkpoint key and
shape from a config; the parameter counts it gives are tested against the official
`vit_jax/models_test.py`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace

from minivit.models.config import MixerConfig, ResNetConfig, ViTConfig

Config = ViTConfig | MixerConfig


def _vit(name: str, patch: int, hidden: int, mlp: int, heads: int, layers: int, **kw) -> ViTConfig:
    return ViTConfig(name, (patch, patch), hidden, mlp, heads, layers, **kw)


def _registered() -> dict[str, Config]:
    ti16 = _vit("ViT-Ti_16", 16, 192, 768, 3, 12)
    s16 = _vit("ViT-S_16", 16, 384, 1536, 6, 12)
    b16 = _vit("ViT-B_16", 16, 768, 3072, 12, 12)
    l16 = _vit("ViT-L_16", 16, 1024, 4096, 16, 24, dropout_rate=0.1)
    s32 = replace(s16, name="ViT-S_32", patches=(32, 32))
    b32 = replace(b16, name="ViT-B_32", patches=(32, 32))
    configs: list[Config] = [
        ti16,
        s16,
        b16,
        l16,
        _vit("ViT-H_14", 14, 1280, 5120, 16, 32, dropout_rate=0.1),
        replace(b16, name="ViT-B_8", patches=(8, 8)),
        s32,
        b32,
        replace(l16, name="ViT-L_32", patches=(32, 32), dropout_rate=0.0),
        replace(s16, name="ViT-S_16-gap-norep", classifier="gap"),
        replace(b16, name="ViT-B_16-gap-norep", classifier="gap"),
        replace(s32, name="ViT-S_32-gap-norep", classifier="gap"),
        replace(b32, name="ViT-B_32-gap-norep", classifier="gap"),
        # The root alone (conv_root + max pool) downsamples 4x; 8x8 patches on it.
        replace(ti16, name="R+ViT-Ti_16", patches=(8, 8), resnet=ResNetConfig((), 1)),
        # (3, 4, 9) units: three stages, 16x downsampling, so 1x1 patches give /16.
        replace(
            b16,
            name="R50+ViT-B_16",
            patches=(1, 1),
            dropout_rate=0.1,
            resnet=ResNetConfig((3, 4, 9), 1),
        ),
        replace(b32, name="R26+ViT-B_32", patches=(1, 1), resnet=ResNetConfig((2, 2, 2, 2), 1)),
        replace(s16, name="R26+ViT-S_32", patches=(1, 1), resnet=ResNetConfig((2, 2, 2, 2), 1)),
        replace(l16, name="R50+ViT-L_32", patches=(1, 1), resnet=ResNetConfig((3, 4, 6, 3), 1)),
        MixerConfig("Mixer-B_16", (16, 16), 768, 12, 384, 3072),
        MixerConfig("Mixer-B_32", (32, 32), 768, 12, 384, 3072),
        MixerConfig("Mixer-L_16", (16, 16), 1024, 24, 512, 4096),
    ]
    return {c.name: c for c in configs}


MODELS: dict[str, Config] = _registered()


@dataclass(frozen=True)
class AugRegName:
    """The fields of an AugReg checkpoint file name ("How to train your ViT?", Steiner et al.).

    `B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384`
    is upstream (pre-training) settings, then after `--` the fine-tuning settings.
    """

    model: str  # official name, e.g. "ViT-B_16"
    upstream: str  # pre-training data set: "i21k" (ImageNet-21k) or "i1k" (ImageNet-1k)
    epochs: int  # pre-training epochs
    lr: float  # pre-training base learning rate
    aug: str  # augmentation level: none, light0/1, medium1/2, strong1/2
    wd: float  # weight decay
    do: float  # dropout rate
    sd: float  # stochastic depth rate
    downstream: str | None = None  # fine-tuning data set, e.g. "imagenet2012"; None = upstream file
    steps: int | None = None  # fine-tuning steps ("20k" -> 20000)
    downstream_lr: float | None = None  # fine-tuning learning rate
    res: int | None = None  # fine-tuning image resolution


_NUM = r"\d+(?:\.\d+)?(?:e-?\d+)?"
_AUGREG = re.compile(
    rf"(?P<model>[A-Za-z0-9_]+)-(?P<upstream>[a-z0-9]+)-(?P<epochs>\d+)ep-lr_(?P<lr>{_NUM})"
    rf"-aug_(?P<aug>[a-z0-9]+)-wd_(?P<wd>{_NUM})-do_(?P<do>{_NUM})-sd_(?P<sd>{_NUM})"
    rf"(?:--(?P<downstream>[A-Za-z0-9_]+)-steps_(?P<steps>\d+)(?P<kilo>k?)-lr_(?P<dlr>{_NUM})"
    rf"-res_(?P<res>\d+))?"
)


def _key(name: str) -> str:
    """Fold the spellings of one model to a single key: `R50+ViT-B/16` -> `r50_b_16`."""
    key = name.strip().lower().replace("/", "_").replace("vit-", "").replace("vit_", "")
    return re.sub(r"[+\-]", "_", key)


_ALIASES: dict[str, str] = {_key(name): name for name in MODELS}


def parse_augreg(name: str) -> AugRegName | None:
    """Parse an AugReg file name (with or without directory and `.npz`); None if it is not one."""
    stem = re.sub(r"\.npz$", "", name.strip().replace("\\", "/").rsplit("/", 1)[-1])
    match = _AUGREG.fullmatch(stem)
    if match is None or _key(match["model"]) not in _ALIASES:
        return None
    g = match.groupdict()
    return AugRegName(
        model=_ALIASES[_key(g["model"])],
        upstream=g["upstream"],
        epochs=int(g["epochs"]),
        lr=float(g["lr"]),
        aug=g["aug"],
        wd=float(g["wd"]),
        do=float(g["do"]),
        sd=float(g["sd"]),
        downstream=g["downstream"],
        steps=None if g["steps"] is None else int(g["steps"]) * (1000 if g["kilo"] else 1),
        downstream_lr=None if g["dlr"] is None else float(g["dlr"]),
        res=None if g["res"] is None else int(g["res"]),
    )


def resolve(name: str) -> tuple[Config, AugRegName | None]:
    """Return the config for an official name, one of its spellings, or an AugReg file name.

    Accepted: `ViT-B_16`, `ViT-B/16`, `B/16`, `B_16`, `R50+ViT-B_16`, `R50-ViT-B_16`, `R50_B_16`,
    `R_Ti_16`, `Mixer-B_16`, and AugReg file names, whose fields come back as an `AugRegName`.
    Like the official `configs/augreg.py`, an AugReg name gets dropout 0 (no AugReg while
    fine-tuning).
    """
    augreg = parse_augreg(name)
    if augreg is not None:
        config = MODELS[augreg.model]
        if isinstance(config, ViTConfig):
            config = replace(config, dropout_rate=0.0)
        return config, augreg
    key = _key(re.sub(r"\.npz$", "", name.strip()))
    if key in _ALIASES:
        return MODELS[_ALIASES[key]], None
    close = difflib.get_close_matches(key, list(_ALIASES), n=4, cutoff=0.5)
    names = [_ALIASES[k] for k in close] or list(MODELS)
    raise ValueError(f"unknown model name {name!r}; closest valid names: {', '.join(names)}")


def feature_grid(config: Config, image_size: int) -> tuple[int, int]:
    """Token grid (gh, gw) that a square `image_size` image gives.

    ViT: VALID patch conv, floor(S/P). Hybrid: conv_root and max pool (stride 2, SAME: ceil) and
    one more stride 2 per stage after the first, then the patch conv. Mixer: SAME stem, ceil(S/P).
    """
    ph, pw = config.patches
    if isinstance(config, MixerConfig):
        return math.ceil(image_size / ph), math.ceil(image_size / pw)
    n = image_size
    if config.resnet is not None:
        for _ in range(2 + max(len(config.resnet.num_layers) - 1, 0)):
            n = math.ceil(n / 2)
    return n // ph, n // pw


def feature_stride(config: Config) -> int:
    """Input pixels per feature-map pixel before the patch conv (1 for plain ViT and Mixer)."""
    if isinstance(config, MixerConfig) or config.resnet is None:
        return 1
    return 4 * 2 ** max(len(config.resnet.num_layers) - 1, 0)


def _resnet_shapes(resnet: ResNetConfig) -> tuple[dict[str, tuple[int, ...]], int]:
    """Keys and shapes of the BiT ResNetV2 part, and its output channels."""
    width = int(64 * resnet.width_factor)
    shapes = {"conv_root/kernel": (7, 7, 3, width)}
    shapes.update({f"gn_root/{p}": (1, 1, 1, width) for p in ("scale", "bias")})
    cin = width
    for i, units in enumerate(resnet.num_layers, start=1):
        f = width * 2 ** (i - 1)  # bottleneck features; the unit outputs 4f
        for j in range(1, units + 1):
            unit = f"block{i}/unit{j}/"
            convs = {"conv1": (1, 1, cin, f), "conv2": (3, 3, f, f), "conv3": (1, 1, f, 4 * f)}
            if j == 1 and (cin != 4 * f or i > 1):  # channels change or stride 2
                convs["conv_proj"] = (1, 1, cin, 4 * f)
            for conv, shape in convs.items():
                gn = unit + conv.replace("conv", "gn")
                shapes[f"{unit}{conv}/kernel"] = shape
                shapes.update({f"{gn}/{p}": (1, 1, 1, shape[-1]) for p in ("scale", "bias")})
            cin = 4 * f
    return shapes, cin


def _dense(name: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}/kernel": (fan_in, fan_out), f"{name}/bias": (fan_out,)}


def _norm(name: str, features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}/scale": (features,), f"{name}/bias": (features,)}


def _encoder_block(i: int, d: int, m: int, nh: int) -> dict[str, tuple[int, ...]]:
    block = f"Transformer/encoderblock_{i}/"
    attention = block + "MultiHeadDotProductAttention_1/"
    shapes = {**_norm(block + "LayerNorm_0", d), **_norm(block + "LayerNorm_2", d)}
    for proj in ("query", "key", "value"):
        shapes[f"{attention}{proj}/kernel"] = (d, nh, d // nh)
        shapes[f"{attention}{proj}/bias"] = (nh, d // nh)
    shapes[attention + "out/kernel"] = (nh, d // nh, d)
    shapes[attention + "out/bias"] = (d,)
    shapes.update(_dense(block + "MlpBlock_3/Dense_0", d, m))
    shapes.update(_dense(block + "MlpBlock_3/Dense_1", m, d))
    return shapes


def _vit_shapes(config: ViTConfig, num_classes: int, image_size: int) -> dict[str, tuple[int, ...]]:
    d, (ph, pw) = config.hidden_size, config.patches
    shapes, channels = _resnet_shapes(config.resnet) if config.resnet is not None else ({}, 3)
    shapes.update({"embedding/kernel": (ph, pw, channels, d), "embedding/bias": (d,)})
    gh, gw = feature_grid(config, image_size)
    token = config.classifier == "token"
    if token:
        shapes["cls"] = (1, 1, d)
    shapes["Transformer/posembed_input/pos_embedding"] = (1, gh * gw + token, d)
    for i in range(config.num_layers):
        shapes.update(_encoder_block(i, d, config.mlp_dim, config.num_heads))
    shapes.update(_norm("Transformer/encoder_norm", d))
    if config.representation_size is not None:
        shapes.update(_dense("pre_logits", d, config.representation_size))
        d = config.representation_size
    return {**shapes, **_dense("head", d, num_classes)}


def _mixer_shapes(
    config: MixerConfig, num_classes: int, image_size: int
) -> dict[str, tuple[int, ...]]:
    c, (ph, pw) = config.hidden_dim, config.patches
    gh, gw = feature_grid(config, image_size)
    t, dt, dc = gh * gw, config.tokens_mlp_dim, config.channels_mlp_dim
    shapes = {"stem/kernel": (ph, pw, 3, c), "stem/bias": (c,)}
    for i in range(config.num_blocks):
        block = f"MixerBlock_{i}/"
        shapes.update(_norm(block + "LayerNorm_0", c))
        shapes.update(_dense(block + "token_mixing/Dense_0", t, dt))
        shapes.update(_dense(block + "token_mixing/Dense_1", dt, t))
        shapes.update(_norm(block + "LayerNorm_1", c))
        shapes.update(_dense(block + "channel_mixing/Dense_0", c, dc))
        shapes.update(_dense(block + "channel_mixing/Dense_1", dc, c))
    return {**shapes, **_norm("pre_head_layer_norm", c), **_dense("head", c, num_classes)}


def param_shapes(
    config: Config, num_classes: int = 1000, image_size: int = 224
) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of a model and its shape, in the released layout.

    Shapes: hybrid GroupNorm params (1, 1, 1, C); attention kernels (D, NH, K) and (NH, K, D).
    """
    if isinstance(config, MixerConfig):
        return _mixer_shapes(config, num_classes, image_size)
    return _vit_shapes(config, num_classes, image_size)


def param_count(config: Config, num_classes: int = 1000, image_size: int = 224) -> int:
    """Number of parameters of a model (the official counts use 1000 classes at 224)."""
    return sum(math.prod(s) for s in param_shapes(config, num_classes, image_size).values())
