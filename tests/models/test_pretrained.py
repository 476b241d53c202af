"""create_model(weights=PATH): torchvision state dicts and safetensors, adapted to the
classes and input channels (cnnkit.models._pretrained)."""

import pytest
import torch
from safetensors.torch import save_file

import cnnkit
from cnnkit.models import create_model
from cnnkit.workflows.evaluate import evaluate_run


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet18").eval()  # 1000 classes, RGB: torchvision's layout
    folder = tmp_path_factory.mktemp("weights")
    torch.save(model.state_dict(), folder / "resnet18.pth")
    save_file(model.state_dict(), str(folder / "resnet18.safetensors"))
    return model, folder


@pytest.mark.parametrize("name", ["resnet18.pth", "resnet18.safetensors"])
def test_weights_load_exactly(source, name):
    model, folder = source
    loaded = create_model("resnet18", weights=folder / name).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_another_number_of_classes_keeps_the_backbone_and_a_fresh_head(source):
    model, folder = source
    ten = create_model("resnet18", num_classes=10, weights=folder / "resnet18.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ten.forward_features(x), model.forward_features(x))
    assert ten.fc.weight.shape == (10, 512)


@pytest.mark.parametrize("in_chans", [1, 6])
def test_the_first_convolution_adapts_to_the_input_channels(source, in_chans):
    """A grey image gives what RGB gives for it repeated: one channel sums the kernels;
    six channels repeat and halve them, so [x, x] gives what x gives."""
    model, folder = source
    adapted = create_model("resnet18", in_chans=in_chans,
                           weights=folder / "resnet18.pth").eval()
    rgb = torch.rand(2, 3, 64, 64)
    if in_chans == 1:
        grey = torch.rand(2, 1, 64, 64)
        torch.testing.assert_close(adapted(grey), model(grey.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(adapted(torch.cat([rgb, rgb], 1)), model(rgb),
                                   rtol=1e-4, atol=1e-4)


def test_weights_of_another_architecture_are_one_line(source, tmp_path):
    _, folder = source
    with pytest.raises(ValueError, match="does not hold weights of this ResNet: .* keys "):
        create_model("resnet34", weights=folder / "resnet18.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold weights"):
        create_model("resnet18", weights=tmp_path / "bad.pth")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot be read as weights"):
        create_model("resnet18", weights=tmp_path / "evil.pth")
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="neither .pth/.pt nor .safetensors"):
        create_model("resnet18", weights=tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("resnet18", weights=tmp_path / "none.pth")


def test_a_run_started_from_a_weights_file_reloads_without_it(tmp_path):
    """`cnnkit train --model-opt weights=FILE`: the run starts from the file, and its own
    weights are all that loading the run needs afterwards."""
    start = tmp_path / "start.safetensors"
    save_file(create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8).state_dict(),
              str(start))
    result = cnnkit.train(model="tinyvgg", data="digits", epochs=1, runs_dir=tmp_path / "runs",
                          model_kwargs={"weights": str(start)}, progress=False)
    start.unlink()
    run = cnnkit.load_run(result.path)
    assert run.config.model_kwargs == {"weights": str(start)}
    assert evaluate_run(result.path)["test_accuracy"] == pytest.approx(result["test_accuracy"])
