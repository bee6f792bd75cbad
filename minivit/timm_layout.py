"""timm / Hugging Face state dicts of `vit_*`, `vit_*_r*` hybrids and `mixer_*` <-> the official
npz layout.

timm (and the `timm/...` repositories on the Hugging Face hub) store the same weights as the
released `.npz` files in PyTorch layouts: Linear weights (out, in), conv weights OIHW, the three
attention projections fused into one `qkv` Linear of (3 D, D) rows [q; k; v] with each D split
head-major (NH, K), GroupNorm params (C,). The official layout has Dense kernels (in, out), HWIO
convs, attention kernels (D, NH, K) and (NH, K, D), hybrid GroupNorm params (1, 1, 1, C).
The key names follow timm's own npz loader (`vision_transformer._load_weights`) and its
`ResNetV2` / `MlpMixer` modules. `.safetensors` files are read with the `safetensors` package
(NumPy API); `.bin` / `.pth` files need torch, imported only for them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from minivit.checkpoint import (
    STATE_DICT_SUFFIXES,
    CheckpointError,
    as_float32,
    expand_group_norm,
    infer_config,
    read_npz,
    write_npz,
)
from minivit.models.config import ViTConfig
from minivit.models.registry import MODELS

TORCH_SUFFIXES = (".bin", ".pth", ".pt")

# (timm key, official key, layout change). Indices: {i} block, {s} stage, {u} unit (timm counts
# from 0; the official `block{S}/unit{U}` from 1: S = s + 1, U = u + 1), {r} conv 1..3.
_COMMON = [
    ("head.weight", "head/kernel", "dense"),
    ("head.bias", "head/bias", "copy"),
]
_B = "Transformer/encoderblock_{i}/"
_UNIT = "patch_embed.backbone.stages.{s}.blocks.{u}."
_VIT = [
    ("cls_token", "cls", "copy"),
    ("pos_embed", "Transformer/posembed_input/pos_embedding", "copy"),
    ("patch_embed.proj.weight", "embedding/kernel", "conv"),
    ("patch_embed.proj.bias", "embedding/bias", "copy"),
    ("blocks.{i}.norm1.weight", _B + "LayerNorm_0/scale", "copy"),
    ("blocks.{i}.norm1.bias", _B + "LayerNorm_0/bias", "copy"),
    ("blocks.{i}.attn.proj.weight", _B + "MultiHeadDotProductAttention_1/out/kernel", "out"),
    ("blocks.{i}.attn.proj.bias", _B + "MultiHeadDotProductAttention_1/out/bias", "copy"),
    ("blocks.{i}.norm2.weight", _B + "LayerNorm_2/scale", "copy"),
    ("blocks.{i}.norm2.bias", _B + "LayerNorm_2/bias", "copy"),
    ("blocks.{i}.mlp.fc1.weight", _B + "MlpBlock_3/Dense_0/kernel", "dense"),
    ("blocks.{i}.mlp.fc1.bias", _B + "MlpBlock_3/Dense_0/bias", "copy"),
    ("blocks.{i}.mlp.fc2.weight", _B + "MlpBlock_3/Dense_1/kernel", "dense"),
    ("blocks.{i}.mlp.fc2.bias", _B + "MlpBlock_3/Dense_1/bias", "copy"),
    ("norm.weight", "Transformer/encoder_norm/scale", "copy"),
    ("norm.bias", "Transformer/encoder_norm/bias", "copy"),
    ("pre_logits.fc.weight", "pre_logits/kernel", "dense"),  # timm < 0.6 kept this layer
    ("pre_logits.fc.bias", "pre_logits/bias", "copy"),
    # Hybrid backbone: ResNetV2(preact=False, stem_type="same"); root-only models (R+Ti/16) use
    # the bare stem as backbone, without the `stem.` level.
    ("patch_embed.backbone.stem.conv.weight", "conv_root/kernel", "conv"),
    ("patch_embed.backbone.stem.norm.weight", "gn_root/scale", "gn"),
    ("patch_embed.backbone.stem.norm.bias", "gn_root/bias", "gn"),
    ("patch_embed.backbone.conv.weight", "conv_root/kernel", "conv"),
    ("patch_embed.backbone.norm.weight", "gn_root/scale", "gn"),
    ("patch_embed.backbone.norm.bias", "gn_root/bias", "gn"),
    (_UNIT + "conv{r}.weight", "block{S}/unit{U}/conv{r}/kernel", "conv"),
    (_UNIT + "norm{r}.weight", "block{S}/unit{U}/gn{r}/scale", "gn"),
    (_UNIT + "norm{r}.bias", "block{S}/unit{U}/gn{r}/bias", "gn"),
    (_UNIT + "downsample.conv.weight", "block{S}/unit{U}/conv_proj/kernel", "conv"),
    (_UNIT + "downsample.norm.weight", "block{S}/unit{U}/gn_proj/scale", "gn"),
    (_UNIT + "downsample.norm.bias", "block{S}/unit{U}/gn_proj/bias", "gn"),
]
_MIXER = [
    ("stem.proj.weight", "stem/kernel", "conv"),
    ("stem.proj.bias", "stem/bias", "copy"),
    ("blocks.{i}.norm1.weight", "MixerBlock_{i}/LayerNorm_0/scale", "copy"),
    ("blocks.{i}.norm1.bias", "MixerBlock_{i}/LayerNorm_0/bias", "copy"),
    ("blocks.{i}.mlp_tokens.fc1.weight", "MixerBlock_{i}/token_mixing/Dense_0/kernel", "dense"),
    ("blocks.{i}.mlp_tokens.fc1.bias", "MixerBlock_{i}/token_mixing/Dense_0/bias", "copy"),
    ("blocks.{i}.mlp_tokens.fc2.weight", "MixerBlock_{i}/token_mixing/Dense_1/kernel", "dense"),
    ("blocks.{i}.mlp_tokens.fc2.bias", "MixerBlock_{i}/token_mixing/Dense_1/bias", "copy"),
    ("blocks.{i}.norm2.weight", "MixerBlock_{i}/LayerNorm_1/scale", "copy"),
    ("blocks.{i}.norm2.bias", "MixerBlock_{i}/LayerNorm_1/bias", "copy"),
    ("blocks.{i}.mlp_channels.fc1.weight", "MixerBlock_{i}/channel_mixing/Dense_0/kernel", "dense"),
    ("blocks.{i}.mlp_channels.fc1.bias", "MixerBlock_{i}/channel_mixing/Dense_0/bias", "copy"),
    ("blocks.{i}.mlp_channels.fc2.weight", "MixerBlock_{i}/channel_mixing/Dense_1/kernel", "dense"),
    ("blocks.{i}.mlp_channels.fc2.bias", "MixerBlock_{i}/channel_mixing/Dense_1/bias", "copy"),
    ("norm.weight", "pre_head_layer_norm/scale", "copy"),
    ("norm.bias", "pre_head_layer_norm/bias", "copy"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")  # (3 D, D), (3 D,)
_ATTENTION = re.compile(
    _B.format(i=r"(\d+)") + r"MultiHeadDotProductAttention_1/(query|key|value)/"
)

# Official Dense kernel / HWIO conv <- timm Linear (out, in) / OIHW conv, and back.
_TO_OFFICIAL = {
    "copy": lambda w: w,
    "dense": lambda w: w.T,  # (out, in) -> (in, out)
    "conv": lambda w: w.transpose(2, 3, 1, 0),  # (O, I, H, W) -> (H, W, I, O)
    "gn": lambda w: w.reshape(1, 1, 1, -1),  # (C,) -> (1, 1, 1, C)
}
_TO_TIMM = {
    "copy": lambda w: w,
    "dense": lambda w: w.T,  # (in, out) -> (out, in)
    "conv": lambda w: w.transpose(3, 2, 0, 1),  # (H, W, I, O) -> (O, I, H, W)
    "gn": lambda w: w.reshape(-1),  # (1, 1, 1, C) -> (C,)
}


def _regex(pattern: str) -> re.Pattern:
    """A key pattern as a regex: {i} {s} {u} {S} {U} {r} become named digit groups."""
    return re.compile(re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(pattern)))


def _indices(match: re.Match) -> dict[str, int]:
    """All index spellings from one match: timm 0-based s/u and official 1-based S/U."""
    found = {k: int(v) for k, v in match.groupdict().items()}
    if "s" in found:
        found.update(S=found["s"] + 1, U=found["u"] + 1)
    if "S" in found:
        found.update(s=found["S"] - 1, u=found["U"] - 1)
    return found


def _heads(width: int, num_heads: int | None) -> int:
    """Head count: given, or that of the official models of this width (timm files omit it)."""
    if num_heads is not None:
        if num_heads < 1 or width % num_heads:
            raise CheckpointError(f"num_heads={num_heads} does not divide the width {width}")
        return num_heads
    known = {c.hidden_size: c.num_heads for c in MODELS.values() if isinstance(c, ViTConfig)}
    if width not in known:
        raise CheckpointError(
            f"a state dict of width {width} matches no official ViT, so its number of attention "
            "heads is unknown; pass num_heads"
        )
    return known[width]


def _split_qkv(state: dict, i: int, num_heads: int | None) -> dict[str, np.ndarray]:
    """timm's fused qkv of block i -> official query/key/value kernels (D, NH, K), bias (NH, K)."""
    names = (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias")
    for name in names:
        if name not in state:
            raise CheckpointError(f"the state dict lacks {name!r}, which every timm ViT block has")
    weight, bias = state[names[0]], state[names[1]]  # (3 D, D), (3 D,)
    d = weight.shape[1]
    nh = _heads(d, num_heads)
    prefix = _B.format(i=i) + "MultiHeadDotProductAttention_1/"
    out = {}
    for n, name in enumerate(("query", "key", "value")):
        rows = slice(n * d, (n + 1) * d)
        out[f"{prefix}{name}/kernel"] = weight[rows].T.reshape(d, nh, d // nh)  # (D, NH, K)
        out[f"{prefix}{name}/bias"] = bias[rows].reshape(nh, d // nh)  # (NH, K)
    return out


def _fused_qkv(params: dict, i: int) -> dict[str, np.ndarray]:
    """Official query/key/value of block i -> timm's fused qkv Linear, rows [q; k; v]."""
    prefix = _B.format(i=i) + "MultiHeadDotProductAttention_1/"
    kernels = [params[f"{prefix}{n}/kernel"] for n in ("query", "key", "value")]  # (D, NH, K)
    biases = [params[f"{prefix}{n}/bias"] for n in ("query", "key", "value")]  # (NH, K)
    d = kernels[0].shape[0]
    return {
        f"blocks.{i}.attn.qkv.weight": np.concatenate([k.reshape(d, -1).T for k in kernels]),
        f"blocks.{i}.attn.qkv.bias": np.concatenate([b.reshape(-1) for b in biases]),
    }


def _strip_wrappers(state: dict) -> dict:
    """Drop a `module.` prefix that `DistributedDataParallel` state dicts carry."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return state


def _map_key(key: str, rules: list[tuple[re.Pattern, str, str]]) -> tuple[str, str] | None:
    """(translated key, layout change) of the first rule matching `key`, or None."""
    for regex, template, kind in rules:
        match = regex.fullmatch(key)
        if match:
            return template.format(**_indices(match)), kind
    return None


def to_official(state: dict, num_heads: int | None = None) -> dict[str, np.ndarray]:
    """Official-layout params from a timm `vit_*`, `vit_*_r*` or `mixer_*` state dict.

    Every key must have an official counterpart. `num_heads` is needed only for widths that no
    official model has (timm state dicts do not record it).

    Shapes: qkv.weight (3 D, D) -> query/key/value kernels (D, NH, K); proj.weight (D, D) ->
    out/kernel (NH, K, D) with out/kernel[h, k, :] = proj.weight[:, h * K + k]; OIHW -> HWIO;
    Linear (out, in) -> Dense (in, out); GroupNorm (C,) -> (1, 1, 1, C).
    """
    state = _strip_wrappers(state)
    family = _MIXER if "stem.proj.weight" in state else _VIT
    rules = [(_regex(t), o, kind) for t, o, kind in family + _COMMON]
    params, qkv_blocks = {}, set()
    for key, value in state.items():
        qkv = _QKV.fullmatch(key) if family is _VIT else None
        mapped = None if qkv else _map_key(key, rules)
        if qkv:
            qkv_blocks.add(int(qkv[1]))
        elif mapped is None:
            raise CheckpointError(
                f"state dict key {key!r} has no counterpart in the official ViT/Mixer layout "
                "(minivit reads plain timm vit_*, vit_*_r* and mixer_* models)"
            )
        elif mapped[1] == "out":
            d = value.shape[0]
            nh = _heads(d, num_heads)
            params[mapped[0]] = value.T.reshape(nh, d // nh, d)  # (NH, K, D)
        else:
            params[mapped[0]] = _TO_OFFICIAL[mapped[1]](value)
    for i in sorted(qkv_blocks):
        params.update(_split_qkv(state, i, num_heads))
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in params.items()}


def from_official(params: dict) -> dict[str, np.ndarray]:
    """timm state dict (NumPy arrays) of official-layout params; the inverse of `to_official`.

    The params are validated first (`infer_config`). Root-only hybrids get the bare-stem
    backbone names timm uses for them.

    Shapes: query/key/value kernels (D, NH, K) -> qkv.weight (3 D, D), qkv.bias (3 D,);
    out/kernel (NH, K, D) -> proj.weight (D, D); HWIO -> OIHW; GroupNorm -> (C,).
    """
    params = expand_group_norm(params)
    config, _ = infer_config(params)
    family = _MIXER if "stem/kernel" in params else _VIT
    rules = [(_regex(o), t, kind) for t, o, kind in family + _COMMON]
    state = {}
    for key, value in params.items():
        if _ATTENTION.match(key):
            continue  # fused into qkv below
        name, kind = _map_key(key, rules)  # every validated official key has a rule
        if kind == "out":
            nh, k, d = value.shape
            state[name] = value.reshape(nh * k, d).T  # (D, NH * K)
        else:
            state[name] = _TO_TIMM[kind](value)
    if family is _VIT:
        if config.resnet is not None and not config.resnet.num_layers:
            state = {k.replace(".backbone.stem.", ".backbone."): v for k, v in state.items()}
        for i in range(config.num_layers):
            state.update(_fused_qkv(params, i))
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state.items()}


# ---- files --------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open  # noqa: PLC0415

    try:
        import ml_dtypes  # noqa: F401, PLC0415  (registers bfloat16 with NumPy, if installed)
    except ImportError:
        pass
    try:
        with safe_open(str(path), framework="np") as f:
            arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except TypeError as e:
        raise CheckpointError(
            f"{path} stores a dtype NumPy does not know ({e}); `pip install ml_dtypes` to read "
            "bfloat16 files"
        ) from None
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"{path} is not a valid .safetensors file ({e})") from None
    return arrays, metadata


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415  (only for .bin / .pth files)
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch file and reading it needs torch; `pip install torch`, or use "
            "the .safetensors copy"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise CheckpointError(f"{path} could not be read by torch.load ({e})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"{path}: state dict entry {key!r} is not a tensor")
    return {key: value.detach().float().numpy() for key, value in obj.items()}


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A timm state dict file as float32 NumPy arrays, and its metadata (safetensors only).

    bfloat16 / float16 tensors are widened to float32.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        arrays, metadata = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        arrays, metadata = _read_torch(path), {}
    else:
        raise CheckpointError(f"{path} is not a state dict file ({', '.join(STATE_DICT_SUFFIXES)})")
    return {k: as_float32(v, k, path) for k, v in arrays.items()}, metadata


def read_timm(path: str | os.PathLike, num_heads: int | None = None) -> dict[str, np.ndarray]:
    """Official-layout params of a timm/Hugging Face state dict file.

    The head count comes from `num_heads`, else from the `num_heads` metadata that `convert`
    writes into `.safetensors` files, else from the official model of the same width.
    """
    state, metadata = read_state_dict(path)
    if num_heads is None and "num_heads" in metadata:
        num_heads = int(metadata["num_heads"])
    try:
        return to_official(state, num_heads)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _write_state_dict(path: Path, state: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a state dict atomically: a temporary file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file  # noqa: PLC0415

            save_file(state, tmp, metadata={"format": "pt", **metadata})
        else:
            import torch  # noqa: PLC0415  (only for .bin / .pth files)

            torch.save({key: torch.from_numpy(value) for key, value in state.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, num_heads: int | None = None) -> None:
    """Convert a checkpoint between the official `.npz` layout and a timm state dict.

    The direction follows the extensions: `.npz` -> `.safetensors`/`.bin`/`.pth`, or back.
    The result is validated (`infer_config`) before anything is written, and written atomically.
    """
    src, dst = Path(src), Path(dst)
    if not dst.parent.is_dir():
        raise CheckpointError(f"cannot write {dst}: directory {dst.parent} does not exist")
    if dst.suffix in TORCH_SUFFIXES and importlib.util.find_spec("torch") is None:
        raise CheckpointError(
            f"writing {dst.name} needs torch; `pip install torch` or write a "
            ".safetensors file instead"
        )
    if src.suffix == ".npz" and dst.suffix in STATE_DICT_SUFFIXES:
        params = read_npz(src)
        try:
            state = from_official(params)
        except CheckpointError as e:
            raise CheckpointError(f"{src}: {e}") from None
        config, _ = infer_config(params)
        _write_state_dict(dst, state, {"num_heads": str(getattr(config, "num_heads", 0))})
    elif src.suffix in STATE_DICT_SUFFIXES and dst.suffix == ".npz":
        params = read_timm(src, num_heads)
        try:
            infer_config(params)
        except CheckpointError as e:
            raise CheckpointError(f"{src}: {e}") from None
        write_npz(dst, params)
    else:
        raise CheckpointError(
            f"cannot convert {src.name} to {dst.name}: convert goes from .npz to one of "
            f"{', '.join(STATE_DICT_SUFFIXES)} or back"
        )
