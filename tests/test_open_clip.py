"""The open_clip adapter: a zero-shot target equal to open_clip's own computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from uap.prompts import ZERO_SHOT_TEMPLATES  # noqa: E402
from uap.targets import ModelSpecError, resolve_model  # noqa: E402

ARCH = "ViT-S-32"  # open_clip's smallest ViT
CLASSES = ("goldfish", "apple", "school bus")
TEMPLATES = ZERO_SHOT_TEMPLATES[:3]  # the ensemble rule with fewer prompts: a fast test


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """open_clip's ViT-S-32 with random weights (a non-trivial logit scale), saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = open_clip.create_model(ARCH, pretrained=None).eval()
    with torch.no_grad():
        net.logit_scale.fill_(2.0)
    path = tmp_path_factory.mktemp("oc") / "vit-s-32.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def test_zero_shot_logits_equal_open_clip(saved):
    net, path = saved
    model, _ = resolve_model(f"open_clip:{ARCH}", weights=path)
    model.use_classes(CLASSES, TEMPLATES)
    assert model.preprocessing["crop"] == 224 and model.preprocessing["interpolation"] == "bicubic"
    x = torch.rand(2, 3, 224, 224)
    tokenizer = open_clip.get_tokenizer(ARCH)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = net.encode_image((x - mean) / std, normalize=True)
        weights = []
        for cls in CLASSES:  # prompt ensemble, one class at a time
            prompts = [t.format(c=cls).replace("a apple", "an apple") for t in TEMPLATES]
            text = net.encode_text(tokenizer(prompts), normalize=True)
            weights.append(F.normalize(text.mean(0), dim=-1))
        expected = net.logit_scale.exp() * image @ torch.stack(weights).T
        got = model(x)
        features = model.encoder(x)
    assert got.shape == (2, len(CLASSES))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(features, image, rtol=0, atol=1e-6)
    # other sizes are resized inside to the tower's native 224
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, len(CLASSES))


def test_errors_are_clear(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved
    model, _ = resolve_model(f"open_clip:{ARCH}", weights=path)
    with pytest.raises(ValueError, match="use_classes"):
        model(torch.rand(1, 3, 224, 224))
    with pytest.raises(ModelSpecError, match="needs weights"):
        resolve_model(f"open_clip:{ARCH}")
    visual_only = tmp_path / "visual.safetensors"  # weights of another model: the image tower alone
    save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("visual.")}, str(visual_only))
    with pytest.raises(ModelSpecError, match="do not fit"):
        resolve_model(f"open_clip:{ARCH}", weights=visual_only)
    with pytest.raises(ModelSpecError, match="no pretrained tag"):
        resolve_model(f"open_clip:{ARCH}:nonsense")
    with pytest.raises(ModelSpecError, match="nothing is downloaded"):
        resolve_model("open_clip:ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(ModelSpecError, match="has no model"):
        resolve_model("open_clip:ViT-X-99", weights=path)
