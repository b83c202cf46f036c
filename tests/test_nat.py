"""NAT / DiNAT fidelity: official configurations and checkpoints (paper figures: ``test_families``).

``official_forward`` re-implements the official forward pass from the official state-dict
keys (SHI-Labs/Neighborhood-Attention-Transformer, ``classification/nat.py``), with the
brute-force NATTEN oracle for the attention, so a checkpoint loaded through
``checkpoint_filter_fn`` must give the same logits.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

from oracles import brute_force

# The official configurations (nat.py, dinat.py): depths, heads, embed_dim, mlp_ratio, layer_scale, dilations.
OFFICIAL = {
    "nat_mini": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, None, None),
    "dinat_mini": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, None, ([1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5)),
    "nat_small": ((3, 4, 18, 5), (3, 6, 12, 24), 96, 2, 1e-5, None),
}


def official_state_dict(name, generator):
    depths, heads, dim, mlp_ratio, layer_scale, _ = OFFICIAL[name]

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width), f"{prefix}.bias": rand(width)}

    sd = {
        "patch_embed.proj.0.weight": rand(dim // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": rand(dim // 2),
        "patch_embed.proj.1.weight": rand(dim, dim // 2, 3, 3),
        "patch_embed.proj.1.bias": rand(dim),
        **norm("patch_embed.norm", dim),
    }
    for i, depth in enumerate(depths):
        width = dim * 2**i
        hidden = int(width * mlp_ratio)
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}"
            sd |= norm(f"{p}.norm1", width) | norm(f"{p}.norm2", width)
            sd |= {
                f"{p}.attn.qkv.weight": rand(3 * width, width),
                f"{p}.attn.qkv.bias": rand(3 * width),
                f"{p}.attn.rpb": rand(heads[i], 13, 13, scale=1.0),
                f"{p}.attn.proj.weight": rand(width, width),
                f"{p}.attn.proj.bias": rand(width),
                f"{p}.mlp.fc1.weight": rand(hidden, width),
                f"{p}.mlp.fc1.bias": rand(hidden),
                f"{p}.mlp.fc2.weight": rand(width, hidden),
                f"{p}.mlp.fc2.bias": rand(width),
            }
            if layer_scale:
                sd |= {f"{p}.gamma1": 1 + rand(width), f"{p}.gamma2": 1 + rand(width)}
        if i < len(depths) - 1:
            sd[f"levels.{i}.downsample.reduction.weight"] = rand(2 * width, width, 3, 3)
            sd |= norm(f"levels.{i}.downsample.norm", 2 * width)
    final = dim * 2 ** (len(depths) - 1)
    return sd | norm("norm", final) | {"head.weight": rand(1000, final), "head.bias": rand(1000)}


def official_forward(name, sd, x):
    depths, heads, _, _, layer_scale, dilations = OFFICIAL[name]
    sd = {key: value.double() for key, value in sd.items()}

    def norm(t, prefix):
        return F.layer_norm(t, t.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)

    def linear(t, prefix):
        return F.linear(t, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    x = F.conv2d(x, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=2, padding=1)
    x = F.conv2d(x, sd["patch_embed.proj.1.weight"], sd["patch_embed.proj.1.bias"], stride=2, padding=1)
    x = norm(x.permute(0, 2, 3, 1), "patch_embed.norm")
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}"
            dilation = dilations[i][j] if dilations else 1
            window = 7 * dilation
            shortcut, h = x, norm(x, f"{p}.norm1")
            height, width = h.shape[1:3]
            h = F.pad(h, (0, 0, 0, max(0, window - width), 0, max(0, window - height)))
            batch, hp, wp, channels = h.shape
            head_dim = channels // heads[i]
            qkv = linear(h, f"{p}.attn.qkv").reshape(batch, hp, wp, 3, heads[i], head_dim).permute(3, 0, 4, 1, 2, 5)
            h = brute_force(qkv[0], qkv[1], qkv[2], 7, dilation, sd[f"{p}.attn.rpb"], scale=head_dim**-0.5)
            h = h.permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels)[:, :height, :width]
            h = linear(h, f"{p}.attn.proj")
            x = shortcut + (sd[f"{p}.gamma1"] * h if layer_scale else h)
            h = linear(F.gelu(linear(norm(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
            x = x + (sd[f"{p}.gamma2"] * h if layer_scale else h)
        if i < len(depths) - 1:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"levels.{i}.downsample.reduction.weight"], stride=2, padding=1)
            x = norm(x.permute(0, 2, 3, 1), f"levels.{i}.downsample.norm")
    return linear(norm(x, "norm").mean((1, 2)), "head")


def test_dinat_dilations_follow_official_lists():
    model = timm.create_model("dinat_tiny")
    dilations = [[block.mixer.dilation for block in stage.blocks] for stage in model.stages]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert {block.mixer.kernel_size for stage in model.stages for block in stage.blocks} == {7}


@pytest.mark.parametrize("name, size", [("nat_mini", (64, 80)), ("dinat_mini", (61, 70)), ("nat_small", (40, 33))])
def test_official_checkpoint_loads_and_matches_official_forward(name, size, load_official):
    official = official_state_dict(name, torch.Generator().manual_seed(0))
    model = load_official(name, official).double().eval()
    torch.testing.assert_close(
        model.stages[1].downsample.conv.weight, official["levels.0.downsample.reduction.weight"].double()
    )
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(name, official, x), atol=1e-9, rtol=1e-9)


def test_load_model_maps_an_official_release_through_the_family_filter(tmp_path):
    from visionzoo.checkpoints import load_model

    official = official_state_dict("nat_mini", torch.Generator().manual_seed(0))
    torch.save({"model": official}, tmp_path / "nat_mini_official.pth")
    model = load_model("nat_mini", tmp_path / "nat_mini_official.pth").double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward("nat_mini", official, x), atol=1e-9, rtol=1e-9)
    del official["levels.3.blocks.4.mlp.fc2.bias"]
    torch.save(official, tmp_path / "damaged.pth")
    with pytest.raises(ValueError, match=r"does not fit nat_mini: 1 missing keys \['stages\.3\.blocks\.4\.mlp\.fc2"):
        load_model("nat_mini", tmp_path / "damaged.pth")
