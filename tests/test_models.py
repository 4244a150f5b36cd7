"""fedlib.models: shapes for every data shape, GroupNorm (never BatchNorm), pure under vmap."""

import pytest
import torch
from torch import nn

from fedlib import federated as fl
from fedlib import models
from tolerance import float32_tolerance


@pytest.mark.parametrize("shape,arch", [((1, 8, 8), "small_cnn"), ((1, 28, 28), "small_cnn"),
                                        ((3, 32, 32), "resnet"), ((2,), "mlp")])
def test_classifier_discriminator_generator_shapes(shape, arch):
    clf = models.make_classifier(arch, shape, 7)
    x = torch.randn(5, *shape)
    assert clf(x).shape == (5, 7)
    assert models.make_discriminator(shape)(x).shape == (5,)
    gen = models.make_generator(shape)
    out = gen(torch.randn(5, gen.z_dim))
    assert out.shape == (5, *shape)
    if len(shape) == 3:
        assert out.abs().max() <= 1.0
    for m in (clf, gen):
        assert not any(isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)) for mod in m.modules())


def test_models_are_vmappable_and_sample_independent():
    model = models.SmallCNN()
    ps = fl.stack_params([fl.get_params(models.SmallCNN()) for _ in range(2)])
    x = torch.randn(6, 1, 8, 8)
    out = fl.predict(fl.functional(model), ps, x, stacked=True)
    # GroupNorm: a sample's output does not depend on the rest of the batch
    part = fl.predict(fl.functional(model), ps, x[:2], stacked=True)
    # one forward pass of SmallCNN at width 8: its longest reduction is the head's fan-in, 16 x 4 x 4
    assert torch.allclose(out[:, :2], part, rtol=0, atol=float32_tolerance(part.abs().max(), 16 * 4 * 4, part.numel()))


def test_bad_arch():
    with pytest.raises(ValueError, match="unknown classifier 'vgg'; allowed: 'small_cnn', 'resnet', 'mlp'"):
        models.make_classifier("vgg", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="needs image samples"):
        models.make_classifier("small_cnn", (2,), 10)


def test_head_name_and_feature_generator():
    """The head is the last linear layer of every classifier; FedGen's generator maps (noise, label) to
    that head's input, and one received as a state dict is rebuilt with the same sizes."""
    assert models.head_name(models.SmallCNN()) == "head" and models.head_name(models.ResNet(width=4, blocks=1)) == "head"
    mlp = models.MLP(2, 3, hidden=8, depth=2)
    assert models.head_name(mlp) == "net.4"
    clf = models.SmallCNN(1, 10, width=8)
    G = models.FeatureGenerator(10, clf.head.in_features, noise_dim=8, hidden=32)
    z = G(torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 9]))
    assert z.shape == (5, clf.head.in_features) and clf.head(z).shape == (5, 10)
    again = models.FeatureGenerator.like(G.state_dict(), 10)
    again.load_state_dict(G.state_dict())
    eps, y = torch.randn(4, 8), torch.tensor([1, 1, 0, 5])
    assert torch.equal(again(eps, y), G(eps, y))
    with pytest.raises(ValueError, match="no nn.Linear head"):
        models.head_name(nn.Sequential(nn.Conv2d(1, 1, 1)))
