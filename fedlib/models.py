"""Models: classifiers, discriminators and generators for every data shape fedlib uses.

All normalisation is GroupNorm, never BatchNorm: GroupNorm has no running statistics (no buffers to
average or to mutate inside ``torch.func.vmap``), and it normalises each sample on its own, so it
behaves the same under the strongly non-IID client data of a Dirichlet(0.05) split. No model here
uses dropout either, so a forward pass is a pure function of (parameters, input) - the property the
vectorised client training in :mod:`fedlib.federated` relies on.

Classifiers (return logits [N, C]):
- :class:`SmallCNN`: a few-thousand-parameter CNN for 8x8 digits (also runs on 28x28).
- :class:`ResNet`: a ResNet-style CNN for 32x32 images (the FedGO paper scale: CIFAR-10/100).
- :class:`MLP`: an MLP for 2-D toy data.

Discriminators (return one pre-sigmoid logit per sample, shape [N]): :class:`ConvDiscriminator`,
:class:`MLPDiscriminator`. Generators (noise z [N, z_dim] -> samples): :class:`ConvGenerator` (tanh,
images in [-1, 1]) and :class:`MLPGenerator` (2-D). ``make_classifier`` / ``make_discriminator`` /
``make_generator`` choose one from a data shape.

Data-free distillation (:mod:`fedlib.datafree`) also needs: :class:`FeatureGenerator` (FedGen's
label-conditioned generator of the classifier's *features*, the input of its linear head),
:func:`conditional_noise` (noise with the label one-hot appended: the input of a label-conditioned
image generator, ``make_generator(shape, z_dim=noise + n_classes)``), and :func:`head_name` (which
submodule of a classifier is its head, found the same way for every classifier here).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .utils import check_choice

CLASSIFIERS = ("small_cnn", "resnet", "mlp")


def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` not above ``groups`` (GroupNorm needs one)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def norm(channels: int, groups: int = 4) -> nn.GroupNorm:
    """GroupNorm (vmap-safe, batch-independent; see the module docstring)."""
    return nn.GroupNorm(_groups(channels, groups), channels)


class SmallCNN(nn.Module):
    """conv3x3(w) - GN - ReLU - conv3x3 stride 2 (2w) - GN - ReLU - [conv3x3 stride 2 (2w) when the
    image is larger than 8x8, repeated until the map is at most 4x4] - flatten - linear (no global pooling:
    the head sees every position of the last map). About 3.9k parameters at width 8 on 8x8 images."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 8, image_size: int = 8):
        super().__init__()
        w = width
        layers = [nn.Conv2d(in_channels, w, 3, padding=1), norm(w), nn.ReLU(),
                  nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), norm(2 * w), nn.ReLU()]
        size = math.ceil(image_size / 2)
        while size > 4:
            layers += [nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), norm(2 * w), nn.ReLU()]
            size = math.ceil(size / 2)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * w * size * size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.n1 = norm(c_out, 8)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.n2 = norm(c_out, 8)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out, 8))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        h = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """ResNet-style CNN for 32x32 images: stem, three stages of ``blocks`` basic blocks at widths
    (w, 2w, 4w), strides (1, 2, 2), global pool, linear. ``width=16, blocks=3`` is ResNet-20's shape
    (the FedGO paper trains a ResNet on CIFAR; the exact depth is our choice), with GroupNorm.
    ``width=64, blocks=2, stages=4`` is the CIFAR ResNet-18 (:func:`resnet18`)."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, width: int = 16, blocks: int = 3, stages: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), norm(width, 8),
                                  nn.ReLU())
        layers, c = [], width
        for i, c_out in enumerate(width * 2**j for j in range(stages)):
            for b in range(blocks):
                layers.append(_Block(c, c_out, 2 if (b == 0 and i > 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    """MLP for flat inputs (2-D toy data): Linear - SiLU repeated ``depth`` times, then a linear head."""

    def __init__(self, in_features: int = 2, n_out: int = 2, hidden: int = 64, depth: int = 2):
        super().__init__()
        layers, d = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class MLPDiscriminator(nn.Module):
    """D(x) for flat inputs: returns the pre-sigmoid logit l(x), shape [N] (D = sigmoid(l))."""

    def __init__(self, in_features: int = 2, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.net = MLP(in_features, 1, hidden, depth)

    def forward(self, x):
        return self.net(x).squeeze(-1)


class ConvDiscriminator(nn.Module):
    """D(x) for images: strided convs with LeakyReLU and GroupNorm, then a linear logit, shape [N]."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, width: int = 16):
        super().__init__()
        layers, c, size = [], in_channels, image_size
        while size > 4:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), norm(width), nn.LeakyReLU(0.2)]
            c, size, width = width, math.ceil(size / 2), width * 2
        layers += [nn.Conv2d(c, width, 3, padding=1), norm(width), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * size * size, 1)

    def forward(self, x):
        return self.head(self.features(x).flatten(1)).squeeze(-1)


class MLPGenerator(nn.Module):
    """G(z) for flat data: z [N, z_dim] -> x [N, out_features]."""

    def __init__(self, z_dim: int = 8, out_features: int = 2, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.z_dim = z_dim
        self.net = MLP(z_dim, out_features, hidden, depth)

    def forward(self, z):
        return self.net(z)


class ConvGenerator(nn.Module):
    """G(z) for images: linear to a 4x4 map, then (upsample x2 - conv - GN - ReLU) up to the image size
    (cropped when it is not a power-of-two multiple of 4), a last conv and tanh: images in [-1, 1]."""

    def __init__(self, z_dim: int = 32, out_channels: int = 1, image_size: int = 8, width: int = 32):
        super().__init__()
        self.z_dim, self.image_size, self.width = z_dim, image_size, width
        self.fc = nn.Linear(z_dim, width * 16)
        ups, size, c = [], 4, width
        while size < image_size:
            ups += [nn.Upsample(scale_factor=2), nn.Conv2d(c, max(c // 2, 8), 3, padding=1),
                    norm(max(c // 2, 8)), nn.ReLU()]
            c, size = max(c // 2, 8), size * 2
        self.ups = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z):
        h = torch.relu(self.fc(z)).view(-1, self.width, 4, 4)
        x = self.out(self.ups(h))
        if x.shape[-1] != self.image_size:
            x = x[..., : self.image_size, : self.image_size]
        return torch.tanh(x)


class FeatureGenerator(nn.Module):
    """FedGen's generator G_w(z | y) in the classifier's feature space: noise eps [N, noise_dim] and labels
    y [N] (one-hot appended) -> Linear - ReLU - Linear -> features [N, feature_dim], the input of the
    classifier's head (unbounded output: our choice). Small on purpose: it goes down to every client
    every round."""

    def __init__(self, n_classes: int, feature_dim: int, noise_dim: int = 8, hidden: int = 32):
        super().__init__()
        self.n_classes, self.feature_dim, self.noise_dim = n_classes, feature_dim, noise_dim
        self.net = nn.Sequential(nn.Linear(noise_dim + n_classes, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim))

    def forward(self, eps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(conditional_noise(eps, y, self.n_classes))

    @classmethod
    def like(cls, params: dict, n_classes: int) -> "FeatureGenerator":
        """An untrained generator with the architecture of ``params`` (its state dict, e.g. received from
        the server): the sizes are read from the two weight matrices."""
        w0, w1 = params["net.0.weight"], params["net.2.weight"]
        return cls(n_classes, w1.shape[0], noise_dim=w0.shape[1] - n_classes, hidden=w0.shape[0])


def conditional_noise(eps: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[eps, one_hot(y)]: the input of a label-conditioned generator."""
    return torch.cat([eps, nn.functional.one_hot(y, n_classes).to(eps.dtype)], 1)


def head_name(model: nn.Module) -> str:
    """The name of the classifier's head: its last ``nn.Linear`` submodule (``"head"`` for
    :class:`SmallCNN` and :class:`ResNet`, ``"net.4"``-style for :class:`MLP`). Its input is what FedGen
    calls the feature space."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head; allowed: a classifier ending in a linear layer")
    return names[-1]


def make_classifier(arch: str, sample_shape: tuple, n_classes: int, **kw) -> nn.Module:
    """``arch`` in ``CLASSIFIERS``; ``sample_shape`` is one sample's shape, e.g. (1, 8, 8) or (2,)."""
    check_choice("classifier", arch, CLASSIFIERS, fix="Use 'small_cnn' for digits / Fashion-MNIST, "
                 "'resnet' for 32x32 images, 'mlp' for 2-D data.")
    if arch == "mlp":
        return MLP(int(math.prod(sample_shape)), n_classes, **kw)
    if len(sample_shape) != 3:
        raise ValueError(f"classifier {arch!r} needs image samples (C, H, W), got shape {tuple(sample_shape)}; "
                         "use arch='mlp' for flat data")
    if arch == "small_cnn":
        return SmallCNN(sample_shape[0], n_classes, image_size=sample_shape[-1], **kw)
    return ResNet(sample_shape[0], n_classes, **kw)


def make_discriminator(sample_shape: tuple, **kw) -> nn.Module:
    """A discriminator returning one logit per sample for data of ``sample_shape``."""
    if len(sample_shape) == 3:
        return ConvDiscriminator(sample_shape[0], sample_shape[-1], **kw)
    return MLPDiscriminator(int(math.prod(sample_shape)), **kw)


def make_generator(sample_shape: tuple, **kw) -> nn.Module:
    """A generator G(z) producing samples of ``sample_shape`` (``.z_dim`` says the noise size)."""
    if len(sample_shape) == 3:
        return ConvGenerator(out_channels=sample_shape[0], image_size=sample_shape[-1], **kw)
    return MLPGenerator(out_features=int(math.prod(sample_shape)), **kw)


def resnet18(in_channels: int = 3, n_classes: int = 10) -> ResNet:
    """The CIFAR ResNet-18 (four stages of two basic blocks at 64-512 channels; GroupNorm in place of
    BatchNorm, the same parameter count): the FedGO paper's classifier class, for cost accounting."""
    return ResNet(in_channels, n_classes, width=64, blocks=2, stages=4)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
