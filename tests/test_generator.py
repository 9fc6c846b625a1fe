import pytest
import torch

from muse.generator import NoisyLayerGenerator, class_cycle


def make_generator(resolutions=(8, 12, 16, 32), output="heads", batch_size=20):
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    return NoisyLayerGenerator(embeddings, list(resolutions), out_chans=3, batch_size=batch_size, ngf=8,
                               noise_dim=16, init_size=4, output=output)


@pytest.mark.parametrize("output", ["heads", "resize"])
def test_outputs_every_resolution_in_range(output):
    generator = make_generator(output=output)
    labels = class_cycle(20, 10)
    for resolution in (8, 12, 16, 32):
        images = generator(labels, resolution)
        assert images.shape == (20, 3, resolution, resolution)
        assert images.min() >= 0 and images.max() <= 1


def test_low_resolutions_stop_early_in_the_trunk():
    generator = make_generator()
    assert [generator.stage_for(r) for r in (8, 12, 16, 32)] == [0, 1, 1, 2]
    assert set(generator.heads) == {"0", "1", "2"}


def test_unknown_resolution_is_refused():
    with pytest.raises(ValueError, match="not in the generator's set"):
        make_generator()(class_cycle(20, 10), 24)


def test_redraw_replaces_the_noisy_layers_and_keeps_the_trunk():
    generator = make_generator()
    noisy_before = [p.clone() for p in generator.noisy_layers.parameters()]
    trunk_before = [p.clone() for p in generator.trunk_parameters()]
    generator.redraw_noise()
    assert all(not torch.equal(a, b) for a, b in zip(noisy_before, generator.noisy_layers.parameters())
               if a.dim() == 2)
    assert all(torch.equal(a, b) for a, b in zip(trunk_before, generator.trunk_parameters()))
    weight = generator.noisy_layers[0].weight
    assert weight.std().item() == pytest.approx(1.0, abs=0.15)


def test_one_noisy_layer_per_copy_of_the_classes():
    generator = make_generator(batch_size=25)
    assert len(generator.noisy_layers) == 3
    assert generator(class_cycle(25, 10), 8).shape[0] == 25
    assert class_cycle(12, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
