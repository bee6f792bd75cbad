"""`Model`: one ViT, hybrid or Mixer network with its checkpoint-keyed parameters and the calls
users make on it (predict, features, loss and gradients, intermediates, attention maps, save).

`build_model` makes the network for a config; `create_model` adds the official initialisation
(`vit_jax` models: LeCun-normal convs and `pre_logits`, Xavier-uniform attention and MLP kernels,
N(0, 1e-6) MLP biases, N(0, 0.02) position embeddings, zero `cls`, zero head, zero `gn3` scales).
"""

from __future__ import annotations

import os

import numpy as np

from minivit import backend, nn, ops
from minivit.autograd import Tensor, no_grad
from minivit.models.config import MixerConfig, ViTConfig
from minivit.models.mixer import MlpMixer
from minivit.models.registry import resolve
from minivit.models.vit import VisionTransformer, attention_maps


class Model:
    """A network, its config, class count, input size and device.

    Shapes: images (B, S, S, 3) float32 NHWC in [-1, 1], S = image_size -> logits (B, classes).
    """

    def __init__(
        self, net: nn.Module, config: ViTConfig | MixerConfig, num_classes: int, image_size: int
    ):
        self.net = net
        self.config = config
        self.num_classes = num_classes
        self.image_size = image_size
        self.device = backend.Device("cpu")

    def __repr__(self) -> str:
        return (
            f"Model({self.config.name}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, device={self.device})"
        )

    # ---- parameters --------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, object]:
        """Official npz key -> the model's own array (no copy; updates in place are seen)."""
        return self.net.state_dict()

    @property
    def num_params(self) -> int:
        return sum(int(param.size) for _, param in self.net.named_parameters())

    def load_params(self, params: dict) -> None:
        """Copy `params` (official keys and shapes, strict) onto the model's device."""
        self.net.load_state_dict(params)

    def initialize(self, seed: int = 0) -> Model:
        """Fresh official initialisation, drawn from `numpy.random.default_rng(seed)`."""
        self.net.initialize(np.random.default_rng(seed))
        return self

    def to(self, device: backend.Device | str) -> Model:
        """Move the parameters to `device` ("cpu" or "cuda:N")."""
        self.device = backend.Device.parse(device)
        self.net.to(self.device)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the parameters as a released-layout `.npz` (flat, `/`-joined keys, float32),
        atomically (`minivit.checkpoint.write_npz`)."""
        from minivit.checkpoint import write_npz  # noqa: PLC0415  (checkpoint sits above models)

        write_npz(path, self.params)

    # ---- computation -------------------------------------------------------------------------
    def forward(
        self, images, train: bool = False, rng: np.random.Generator | None = None
    ) -> Tensor:
        """Logits; dropout at the config's rates only when `train` (drawn from `rng`).

        Shapes: images (B, S, S, 3) -> (B, classes).
        """
        if train and rng is None:
            rng = np.random.default_rng()
        self.net.train(train, rng if train else None)
        return self.net(self._images(images))

    def loss_and_grads(
        self, images, labels, train: bool = False, rng: np.random.Generator | None = None
    ) -> tuple[float, dict]:
        """Mean softmax cross-entropy and its gradient for every parameter, keyed like `params`.

        Shapes: labels (B,) int class indices or (B, classes) one-hot / soft; every gradient has
        its parameter's shape and device.
        """
        labels = self._labels(labels)
        self.net.zero_grad()
        loss = ops.softmax_cross_entropy(self.forward(images, train, rng), labels)
        loss.backward()
        grads = {key: param.grad for key, param in self.net.named_parameters()}
        self.net.zero_grad()
        return loss.item(), grads

    def predict(self, images) -> np.ndarray:
        """Logits in evaluation mode as a host array. Shapes: (B, S, S, 3) -> (B, classes)."""
        with no_grad():
            return self.forward(images).numpy()

    def features(self, images) -> np.ndarray:
        """The pre-logits features the head sees, in evaluation mode, as a host array.

        Shapes: (B, S, S, 3) -> (B, D), or (B, R) with a representation layer.
        """
        self.net.eval()
        with no_grad():
            return self.net.features(self._images(images)).numpy()

    def intermediates(self, images) -> dict[str, np.ndarray]:
        """Every named module's output in evaluation mode, keyed like the official
        `capture_intermediates` paths (`embedding`, `Transformer/encoderblock_0`, `head`, ...)."""
        self.net.eval()
        with no_grad(), nn.capture(self.net) as outputs:
            self.net(self._images(images))
        return outputs

    def attention_maps(self, images) -> list[np.ndarray]:
        """Attention probabilities of every encoder block (ViT and hybrids).

        Shapes: (B, S, S, 3) -> list of num_layers arrays (B, NH, N, N), rows summing to 1.
        """
        if not isinstance(self.config, ViTConfig):
            raise ValueError(
                f"attention_maps needs a ViT or hybrid; {self.config.name} is a "
                "Mixer, which has no attention"
            )
        return attention_maps(self.intermediates(images), self.config.num_layers)

    # ---- input checks ------------------------------------------------------------------------
    def _images(self, images) -> Tensor:
        data = images.data if isinstance(images, Tensor) else images
        size = self.image_size
        if getattr(data, "ndim", 0) != 4 or tuple(data.shape[1:]) != (size, size, 3):
            raise ValueError(
                f"images must be NHWC of shape (B, {size}, {size}, 3) for this model, got "
                f"{tuple(getattr(data, 'shape', ()))}; resize them to {size}x{size} RGB or load "
                "the model with image_size set to their size"
            )
        if not np.issubdtype(data.dtype, np.floating):
            raise ValueError(
                f"images must be float32 in [-1, 1], got dtype {data.dtype}; "
                "convert uint8 pixels with (x - 127.5) / 127.5"
            )
        on_device = backend.xp_of(data) is self.device.xp
        if isinstance(images, Tensor) and images.dtype == backend.DTYPE and on_device:
            return images  # kept as it is, so a gradient can flow back to the pixels
        return Tensor(backend.as_float(self.device.put(data), self.device.xp))

    def _labels(self, labels):
        labels = self.device.put(np.asarray(labels) if isinstance(labels, list) else labels)
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            return labels
        if labels.ndim == 2 and labels.shape[1] == self.num_classes:
            return backend.as_float(labels, self.device.xp)
        raise ValueError(
            f"labels must be (B,) integer classes or (B, {self.num_classes}) "
            f"one-hot rows, got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )


def build_model(config: ViTConfig | MixerConfig, num_classes: int, image_size: int) -> Model:
    """The network for `config` with `num_classes` outputs at `image_size`, parameters zero
    until `load_params` or `initialize`."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if isinstance(config, ViTConfig):
        net = VisionTransformer(config, num_classes, image_size)
    elif isinstance(config, MixerConfig):
        net = MlpMixer(config, num_classes, image_size)
    else:
        raise TypeError(f"config must be a ViTConfig or MixerConfig, got {type(config).__name__}")
    return Model(net, config, num_classes, image_size)


def create_model(name: str, num_classes: int = 1000, image_size: int = 224, seed: int = 0) -> Model:
    """A freshly initialised official architecture, by any name `registry.resolve` accepts
    (`B_16`, `ViT-B/16`, `R50+ViT-B_16`, `Mixer-B_16`, AugReg file names, ...)."""
    config, _ = resolve(name)
    return build_model(config, num_classes, image_size).initialize(seed)
