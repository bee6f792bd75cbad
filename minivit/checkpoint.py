"""Released checkpoints: read and write the official `.npz` layout, infer the architecture from
keys and shapes, and prepare a file for fine-tuning the way the official code does.

Mirrors `vit_jax/checkpoint.py` of google-research/vision_transformer (`load`,
`load_pretrained`, `inspect_params`). A released file is a flat, uncompressed `np.savez` archive
whose keys are `/`-joined Flax parameter paths (`Transformer/encoderblock_0/MlpBlock_3/Dense_0/
kernel`); `minivit.models.registry.param_shapes` lists them for a config.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from minivit import backend
from minivit.models.config import MixerConfig, ResNetConfig, ViTConfig
from minivit.models.registry import (
    MODELS,
    Config,
    feature_grid,
    feature_stride,
    param_shapes,
    parse_augreg,
    resolve,
)

POSEMB = "Transformer/posembed_input/pos_embedding"
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")  # timm / Hugging Face files
_BLOCK = "Transformer/encoderblock_{}/"
_LINEN_BLOCK_NAMES = {  # Linen child names inside an encoder block -> released (pre-Linen) names
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUP_NORM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")


class CheckpointError(ValueError):
    """A checkpoint file or parameter dict that minivit cannot use; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What `infer_config` read from a checkpoint besides the architecture."""

    name: str  # registry name of the architecture, or "custom"
    family: str  # "vit", "hybrid" or "mixer"
    image_size: int  # native square image size that the position grid / token MLPs fit
    grid: tuple[int, int]  # native token grid (gh, gw)
    num_classes: int  # outputs of the stored head
    head_is_zero: bool  # head kernel all zeros: a pre-training file, fine-tune before predicting
    param_count: int  # number of parameters in the file


# ---- reading and writing ------------------------------------------------------------------------


def _not_an_npz(path: Path, head: bytes) -> str | None:
    """Name what a non-npz file is from its first bytes, or None when it may be an npz."""
    text = head.lstrip().lower()
    if head.startswith(b"PK"):
        return None
    if head.startswith(b"version https://git-lfs"):
        return (
            f"{path} is a Git LFS pointer file, not the checkpoint; fetch the real file with "
            "`git lfs pull` (or download it directly)"
        )
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<error")):
        return (
            f"{path} is an HTML/XML page (an error page saved by a failed download), not a "
            "checkpoint; download the file again"
        )
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return (
            f"{path} looks like a Flax msgpack checkpoint, not an .npz; export its params with "
            "np.savez(path, **{'/'.join(k): v for k, v in "
            "flax.traverse_util.flatten_dict(params).items()})"
        )
    if head.startswith(b"\x93NUMPY"):
        return f"{path} is a single .npy array, not an .npz checkpoint; save params with np.savez"
    return (
        f"{path} is not an .npz checkpoint (it does not start with a zip header); pass a "
        "released .npz file, or convert a timm/Hugging Face file with `minivit convert`"
    )


def as_float32(array: np.ndarray, key: str, path: str | os.PathLike) -> np.ndarray:
    """Float32 copy of a stored parameter; bfloat16 (`|V2` or uint16 bits) and float16 widened."""
    if array.dtype == np.float32:
        return array
    if array.dtype.name == "bfloat16" or array.dtype.kind == "V" or array.dtype == np.uint16:
        if array.dtype.itemsize != 2:
            raise CheckpointError(
                f"{path}: key {key!r} has an unknown {array.dtype.itemsize}-byte "
                "raw dtype; store parameters as float32, float16 or bfloat16"
            )
        bits = array.view(np.uint16).astype(np.uint32) << 16  # bfloat16 = top half of float32
        return bits.view(np.float32)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    raise CheckpointError(
        f"{path}: key {key!r} has dtype {array.dtype}, not a floating type; "
        "a checkpoint holds float parameters only"
    )


def _official_keys(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip `opt/target/` (old releases) or `params/` (big_vision) and use the released names.

    Linen-named encoder blocks (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`)
    get the released pre-Linen names, as the official `convert_pre_linen` would read them.
    """
    for prefix in ("opt/target/", "params/"):
        if any(key.startswith(prefix) for key in arrays):
            arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            break
    if "pos_embedding" in arrays:  # big_vision keeps it at the top level
        arrays[POSEMB] = arrays.pop("pos_embedding")
    if not any("/MlpBlock_0/" in key for key in arrays):
        return arrays
    renamed = {}
    for key, value in arrays.items():
        parts = key.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = _LINEN_BLOCK_NAMES.get(parts[2], parts[2])
        renamed["/".join(parts)] = value
    return renamed


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """Normalised float32 params of an npz file and the dtype names it stored."""
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; check the path or pass an https:// or gs:// URL"
        )
    with open(path, "rb") as f:
        problem = _not_an_npz(path, f.read(64))
    if problem:
        raise CheckpointError(problem)
    arrays, dtypes = {}, set()
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if not names or not all(f"{n}.npy" in npz.zip.namelist() for n in names):
                raise CheckpointError(
                    f"{path} is a zip archive but not an .npz of arrays (a "
                    "PyTorch file?); convert it with `minivit convert`"
                )
            for name in names:
                array = npz[name]
                dtypes.add("bfloat16" if array.dtype.kind == "V" else array.dtype.name)
                arrays[name] = as_float32(array, name, path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is a truncated or damaged zip/npz ({e}); download it again"
        ) from None
    except ValueError as e:
        raise CheckpointError(
            f"{path} holds something other than plain arrays ({e}); save params with np.savez"
        ) from None
    return _official_keys(arrays), dtypes


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a released-layout `.npz` into `{official key: float32 array}`.

    File shapes are kept (hybrid GroupNorm params stay (1, 1, 1, C)); `opt/target/` and
    `params/` prefixes are stripped; bfloat16 and float16 arrays become float32. Anything that is
    not an npz of float arrays raises a `CheckpointError` naming what the file is instead.
    """
    return _read_npz(Path(path))[0]


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Official-layout params from an `.npz` or a timm/Hugging Face `.safetensors`/`.bin`/`.pth`."""
    path = Path(path)
    if path.suffix in STATE_DICT_SUFFIXES:
        from minivit import timm_layout  # noqa: PLC0415  (timm_layout builds on this module)

        return timm_layout.read_timm(path)
    return read_npz(path)


def write_npz(path: str | os.PathLike, params: dict) -> None:
    """Write params as a released-layout `.npz` (plain, uncompressed `np.savez` layout), atomically.

    The archive is written to a temporary file in the same directory, flushed and fsynced, then
    moved over `path` with `os.replace`: a failure leaves any earlier file untouched and no
    partial file behind. GPU arrays are copied to the host.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, value in params.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        array = np.ascontiguousarray(backend.to_host(value))
                        np.lib.format.write_array(member, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def expand_group_norm(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GroupNorm scale/bias stored (C,) reshaped to the released (1, 1, 1, C); others untouched."""
    return {
        key: value.reshape(1, 1, 1, -1) if value.ndim == 1 and _GROUP_NORM.search(key) else value
        for key, value in params.items()
    }


# ---- architecture inference ---------------------------------------------------------------------


def _shape(params: dict, key: str, ndim: int, what: str) -> tuple[int, ...]:
    if key not in params:
        raise CheckpointError(f"the checkpoint has no key {key!r}, which every {what} file has")
    shape = tuple(params[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(
            f"key {key!r} has shape {shape}, but a {what} stores a {ndim}-dimensional array there"
        )
    return shape


def _count(params: dict, pattern: str, start: int = 0) -> int:
    """Number of consecutive indices start, start + 1, ... with a key starting with pattern(i)."""
    n = start
    while any(key.startswith(pattern.format(n)) for key in params):
        n += 1
    return n - start


def _infer_resnet(params: dict) -> ResNetConfig:
    width = _shape(params, "conv_root/kernel", 4, "hybrid")[3]
    units: list[int] = []
    while _count(params, f"block{len(units) + 1}/unit{{}}/", start=1):
        units.append(_count(params, f"block{len(units) + 1}/unit{{}}/", start=1))
    return ResNetConfig(tuple(units), width / 64)


def _infer_vit(params: dict) -> ViTConfig:
    ph, pw, _, d = _shape(params, "embedding/kernel", 4, "ViT")
    block = _BLOCK.format(0)
    _, nh, _ = _shape(params, block + "MultiHeadDotProductAttention_1/query/kernel", 3, "ViT")
    mlp = _shape(params, block + "MlpBlock_3/Dense_0/kernel", 2, "ViT")[1]
    representation = None
    if "pre_logits/kernel" in params:
        representation = _shape(params, "pre_logits/kernel", 2, "ViT")[1]
    return ViTConfig(
        name="custom",
        patches=(ph, pw),
        hidden_size=d,
        mlp_dim=mlp,
        num_heads=nh,
        num_layers=_count(params, _BLOCK),
        classifier="token" if "cls" in params else "gap",
        representation_size=representation,
        resnet=_infer_resnet(params) if "conv_root/kernel" in params else None,
    )


def _infer_mixer(params: dict) -> MixerConfig:
    ph, pw, _, c = _shape(params, "stem/kernel", 4, "Mixer")
    tokens_mlp = _shape(params, "MixerBlock_0/token_mixing/Dense_0/kernel", 2, "Mixer")[1]
    channels_mlp = _shape(params, "MixerBlock_0/channel_mixing/Dense_0/kernel", 2, "Mixer")[1]
    num_blocks = _count(params, "MixerBlock_{}/")
    return MixerConfig("custom", (ph, pw), c, num_blocks, tokens_mlp, channels_mlp)


def _architecture(config: Config) -> Config:
    """The shape-defining part of a config: no name, dropout or representation layer."""
    if isinstance(config, MixerConfig):
        return replace(config, name="")
    return replace(
        config, name="", dropout_rate=0.0, attention_dropout_rate=0.0, representation_size=None
    )


def _named(config: Config) -> Config:
    """The registry config with the same architecture (its name and dropout rates), if any."""
    for known in MODELS.values():
        if _architecture(known) == _architecture(config):
            if isinstance(known, ViTConfig):
                return replace(known, representation_size=config.representation_size)
            return known
    return config


def describe(config: Config) -> str:
    """One line naming a config's architecture: family, width, depth, heads, patch size."""
    ph, pw = config.patches
    if isinstance(config, MixerConfig):
        return (
            f"Mixer with hidden dim {config.hidden_dim}, {config.num_blocks} blocks, token MLP "
            f"{config.tokens_mlp_dim}, channel MLP {config.channels_mlp_dim}, patch {ph}x{pw}"
        )
    kind = "ViT"
    if config.resnet is not None:
        units = config.resnet.num_layers
        stages = f"units {'/'.join(map(str, units))}" if units else "root only"
        kind = f"ResNet ({stages}, width x{config.resnet.width_factor:g}) + ViT"
    return (
        f"{kind} with hidden size {config.hidden_size}, {config.num_layers} layers, "
        f"{config.num_heads} heads, MLP {config.mlp_dim}, patch {ph}x{pw}"
    )


def _native_grid(config: Config, params: dict, image_size: int | None) -> tuple[int, int]:
    """Token grid of the file: from the position embedding rows (ViT) or the token MLP (Mixer)."""
    if isinstance(config, MixerConfig):
        rows = params["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[0]
        where = "token-mixing MLP of the Mixer"
    else:
        rows = _shape(params, POSEMB, 3, "ViT")[1] - (config.classifier == "token")
        where = "position embedding"
    side = math.isqrt(rows)
    if side * side == rows:
        return side, side
    if image_size is None:
        raise CheckpointError(
            f"the {where} has {rows} grid positions, which is not a square grid, "
            "so the native image size is unknown; pass image_size"
        )
    gh = feature_grid(config, image_size)[0]
    if gh == 0 or rows % gh:
        raise CheckpointError(
            f"the {where} has {rows} grid positions, which no grid of height "
            f"{gh} (image_size {image_size}) holds; pass the image size it was "
            "trained at"
        )
    return gh, rows // gh


def _check_keys(params: dict, expected: dict[str, tuple[int, ...]], config: Config) -> None:
    """Raise a one-sentence error for the first missing key, extra key or wrong shape."""
    what = describe(config)
    for key, shape in expected.items():
        if key not in params:
            raise CheckpointError(f"the checkpoint lacks key {key!r}, which a {what} needs")
        if tuple(params[key].shape) != shape:
            raise CheckpointError(
                f"key {key!r} has shape {tuple(params[key].shape)}, but a "
                f"{what} needs {shape}; the file fits no known architecture"
            )
    for key in params:
        if key not in expected:
            raise CheckpointError(f"the checkpoint has key {key!r}, which no {what} has")


def infer_config(params: dict, image_size: int | None = None) -> tuple[Config, CheckpointInfo]:
    """The architecture of a checkpoint from its keys and shapes alone, validated key by key.

    Family from the keys (`stem` = Mixer, `conv_root` = hybrid); D and the patch from the
    embedding kernel (P, P, C, D); NH from the (D, NH, K) query kernel; M from `Dense_0`; the
    classifier from `cls`; R from `pre_logits`; ResNet stages from `block{i}/unit{j}`, width from
    `conv_root`; the native grid from the position embedding rows. A config equal in shape to a
    registry entry gets its name and dropout rates, otherwise the name is "custom".
    `image_size` is needed only when the grid is not square.

    Shapes: GroupNorm params may be (C,) or (1, 1, 1, C).
    """
    params = expand_group_norm(params)
    if "stem/kernel" in params:
        config, family = _infer_mixer(params), "mixer"
    elif "embedding/kernel" in params:
        config = _infer_vit(params)
        family = "vit" if config.resnet is None else "hybrid"
    else:
        raise CheckpointError(
            "the checkpoint has neither 'embedding/kernel' (ViT, hybrid) nor "
            "'stem/kernel' (Mixer); it is not a ViT/Mixer checkpoint"
        )
    gh, gw = _native_grid(config, params, image_size)
    native = image_size if gh != gw else gh * config.patches[0] * feature_stride(config)
    num_classes = _shape(params, "head/kernel", 2, family)[1]
    expected = param_shapes(config, num_classes, native)
    if gh != gw:
        expected[POSEMB] = tuple(params[POSEMB].shape)
    _check_keys(params, expected, config)
    config = _named(config)
    info = CheckpointInfo(
        name=config.name,
        family=family,
        image_size=native,
        grid=(gh, gw),
        num_classes=num_classes,
        head_is_zero=not np.any(params["head/kernel"]),
        param_count=sum(int(v.size) for v in params.values()),
    )
    return config, info


# ---- fine-tuning preparation --------------------------------------------------------------------


def _linear_zoom_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Order-1 spline resampling of one axis to `size` samples, ends aligned (float64).

    Output index i samples input coordinate i * (n - 1) / (size - 1), as `scipy.ndimage.zoom(...,
    order=1)` and `F.interpolate(mode="bilinear", align_corners=True)` do.
    """
    n = x.shape[axis]
    step = (n - 1) / (size - 1) if size > 1 else 1.0
    coord = np.arange(size) * step
    lo = np.minimum(np.floor(coord).astype(np.int64), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    t = (coord - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, lo, axis=axis) * (1.0 - t) + np.take(x, hi, axis=axis) * t


def resize_posemb(
    posemb: np.ndarray,
    new_grid: tuple[int, int],
    classifier: str,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize position embeddings to a new token grid as the official `load_pretrained` does.

    With classifier "token" row 0 (the cls position) is kept; the grid rows are reshaped to
    (gh, gw, D) in row-major token order and resampled bilinearly with aligned corners
    (`scipy.ndimage.zoom(order=1)`), in float64, then cast back to float32. `old_grid` defaults
    to the square grid the rows form.

    Shapes: posemb (1, T + N_old, D) -> (1, T + gh_new * gw_new, D), T = 1 for "token" else 0.
    """
    tokens = 1 if classifier == "token" else 0
    cls_rows, grid = posemb[:, :tokens], posemb[0, tokens:]  # (1, T, D), (N_old, D)
    if old_grid is None:
        side = math.isqrt(grid.shape[0])
        if side * side != grid.shape[0]:
            raise CheckpointError(
                f"the position embedding has {grid.shape[0]} grid rows, not a "
                "square grid; pass old_grid=(rows, cols)"
            )
        old_grid = (side, side)
    grid = grid.reshape(*old_grid, -1).astype(np.float64)  # (gh, gw, D)
    grid = _linear_zoom_axis(_linear_zoom_axis(grid, new_grid[0], 0), new_grid[1], 1)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(np.float32)  # (1, N_new, D)
    return np.concatenate([cls_rows.astype(np.float32), grid], axis=1)


def _resized(params: dict, config: Config, image_size: int, old_grid: tuple[int, int]) -> dict:
    """Params with the position embedding resized for `image_size` (when its shape differs)."""
    new_grid = feature_grid(config, image_size)
    if isinstance(config, MixerConfig):
        if new_grid != old_grid:
            raise CheckpointError(
                f"a Mixer's token-mixing weights fix its grid at {old_grid} "
                f"tokens, so it cannot run at image_size {image_size}; use the "
                "native size"
            )
        return dict(params)
    out = dict(params)
    if new_grid[0] < 1 or new_grid[1] < 1:
        raise CheckpointError(f"image_size {image_size} is smaller than one patch of {config.name}")
    if new_grid != old_grid:
        out[POSEMB] = resize_posemb(params[POSEMB], new_grid, config.classifier, old_grid)
    return out


def prepare_finetune(
    params: dict,
    config: Config,
    num_classes: int,
    image_size: int,
    representation_size: int | None = None,
    old_grid: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Params ready for fine-tuning, exactly as the official `load_pretrained` makes them.

    The head becomes a zero kernel and zero bias for `num_classes` (the fresh official head);
    `pre_logits` is dropped unless `representation_size` is given (then the file's layer of that
    width is kept); the position embedding is resized to the grid of `image_size` when its shape
    differs (`resize_posemb`). `config` is the file's config (`infer_config`).

    Shapes: head/kernel (D or R, num_classes), head/bias (num_classes,).
    """
    if old_grid is None:
        old_grid = infer_config(params)[1].grid
    out = _resized(params, config, image_size, old_grid)
    width = config.hidden_dim if isinstance(config, MixerConfig) else config.hidden_size
    if representation_size is None:
        out.pop("pre_logits/kernel", None)
        out.pop("pre_logits/bias", None)
    elif "pre_logits/kernel" not in params or params["pre_logits/kernel"].shape[1] != (
        representation_size
    ):
        have = params["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in params else None
        raise CheckpointError(
            f"representation_size={representation_size} keeps the file's "
            f"pre_logits layer, but the file's representation size is {have}; "
            "drop representation_size or pass the file's value"
        )
    else:
        width = representation_size
    out["head/kernel"] = np.zeros((width, num_classes), np.float32)
    out["head/bias"] = np.zeros((num_classes,), np.float32)
    return out


# ---- the public entry points --------------------------------------------------------------------


def _check_model_name(config: Config, model: str, path: Path) -> Config:
    """The registry config named `model` if it matches the file's architecture, else an error."""
    wanted, _ = resolve(model)
    if _architecture(wanted) != _architecture(config):
        raise CheckpointError(
            f"{path} holds a {describe(config)} ({config.name}), which "
            f"contradicts model={model!r} ({wanted.name}: {describe(wanted)}); "
            "drop model= or pass the file of that model"
        )
    if isinstance(wanted, ViTConfig):
        return replace(wanted, representation_size=config.representation_size)
    return wanted


def _prepared(
    path: Path,
    num_classes: int | None,
    image_size: int | None,
    representation_size: int | None,
    model: str | None,
) -> tuple[Config, CheckpointInfo, dict[str, np.ndarray]]:
    """Config, file info and params of a file, prepared as `load` describes."""
    params = expand_group_norm(read_params(path))
    try:
        config, info = infer_config(params, image_size)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if model is not None:
        config = _check_model_name(config, model, path)
    if num_classes is not None:
        size = image_size or info.image_size
        params = prepare_finetune(params, config, num_classes, size, representation_size, info.grid)
        if isinstance(config, ViTConfig):
            config = replace(config, representation_size=representation_size)
    elif representation_size is not None and representation_size != getattr(
        config, "representation_size", None
    ):
        raise CheckpointError(
            f"representation_size applies when fine-tuning; pass num_classes "
            f"too, or drop it to keep the file's layer ({path})"
        )
    elif image_size is not None:
        params = _resized(params, config, image_size, info.grid)
    return config, info, params


def load(
    path_or_url: str | os.PathLike,
    num_classes: int | None = None,
    image_size: int | None = None,
    representation_size: int | None = None,
    model: str | None = None,
):
    """A model with the weights of a checkpoint; the architecture is inferred from the file.

    `path_or_url`: a local `.npz` (or timm/Hugging Face `.safetensors`/`.bin`/`.pth`), an
    `https://` URL or `gs://bucket/path` (fetched into the cache, see `minivit.fetch`).
    With `num_classes` the params are prepared for fine-tuning like the official
    `load_pretrained` (`prepare_finetune`); with only `image_size` the position embeddings are
    resized and the head is kept. `model` (any name `registry.resolve` accepts) must match the
    file; its dropout rates are then used.
    """
    from minivit.fetch import fetch  # noqa: PLC0415
    from minivit.models import build_model  # noqa: PLC0415  (the models layer sits below)

    path = fetch(path_or_url)
    config, info, params = _prepared(path, num_classes, image_size, representation_size, model)
    net = build_model(config, num_classes or info.num_classes, image_size or info.image_size)
    net.load_params(params)
    return net


def _augreg_line(path: Path) -> str | None:
    augreg = parse_augreg(path.name)
    if augreg is None:
        return None
    line = (
        f"AugReg: upstream {augreg.upstream}, {augreg.epochs} epochs, lr {augreg.lr}, "
        f"augmentation {augreg.aug}, weight decay {augreg.wd}, dropout {augreg.do}, "
        f"stochastic depth {augreg.sd}"
    )
    if augreg.downstream is not None:
        line += (
            f"; fine-tuned on {augreg.downstream}, {augreg.steps} steps, lr "
            f"{augreg.downstream_lr}, resolution {augreg.res}"
        )
    return line


def inspect(path_or_url: str | os.PathLike) -> str:
    """A short report on a checkpoint: architecture, parameter count, classifier, native
    resolution, classes, whether the head is all zeros, stored dtypes and AugReg fields."""
    from minivit.fetch import fetch  # noqa: PLC0415

    path = fetch(path_or_url, progress=False)
    if path.suffix == ".npz":
        params, dtypes = _read_npz(path)
    else:
        params, dtypes = read_params(path), {f"a {path.suffix[1:]} state dict"}
    try:
        config, info = infer_config(params)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if isinstance(config, MixerConfig):
        classifier = "global average pooling (Mixer)"
    else:
        pooling = "cls token" if config.classifier == "token" else "global average pooling (gap)"
        layer = config.representation_size
        classifier = f"{pooling}, {'no' if layer is None else f'{layer}-wide'} pre_logits layer"
    gh, gw = info.grid
    lines = [
        f"file: {path} ({path.stat().st_size / 1e6:.1f} MB, stored as {', '.join(sorted(dtypes))})",
        f"architecture: {info.name} ({describe(config)})",
        f"parameters: {info.param_count:,}",
        f"classifier: {classifier}",
        f"native resolution: {info.image_size}x{info.image_size} ({gh}x{gw} tokens)",
        f"classes: {info.num_classes}",
    ]
    if info.head_is_zero:
        lines.append("head: all zeros -- pre-training file: fine-tune before predicting")
    augreg = _augreg_line(path)
    if augreg:
        lines.append(augreg)
    return "\n".join(lines)


def convert(src: str | os.PathLike, dst: str | os.PathLike, num_heads: int | None = None) -> None:
    """Convert between the official `.npz` layout and timm/Hugging Face state dicts, by extension
    (see `minivit.timm_layout.convert`)."""
    from minivit import timm_layout  # noqa: PLC0415

    timm_layout.convert(src, dst, num_heads)


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "convert",
    "describe",
    "expand_group_norm",
    "infer_config",
    "inspect",
    "load",
    "prepare_finetune",
    "read_npz",
    "read_params",
    "resize_posemb",
    "write_npz",
]
