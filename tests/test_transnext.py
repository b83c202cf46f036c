"""TransNeXt fidelity: official checkpoints and numerics (paper figures: ``test_families``).

``official_forward`` re-implements the official forward pass (DaiShiResearch/TransNeXt,
``classification/transnext.py`` with ``attention_native.py``) from the official state-dict
keys: unfolded windows, a padding mask and length scale from a fixed construction size,
CPB tables over unique coordinate pairs. A state dict in that layout, loaded through
``checkpoint_filter_fn``, must give the same logits.
"""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

# transnext_micro's widths and heads; depths shortened for test time
DIMS, HEADS, MLP_RATIOS, SR_RATIOS = (48, 96, 192, 384), (2, 4, 8, 16), (8, 8, 4, 4), (8, 4, 2, 1)


def official_state_dict(depths, generator):
    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    def affine(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width), f"{prefix}.bias": rand(width)}

    def linear(prefix, out_features, in_features, scale=0.1):
        return {f"{prefix}.weight": rand(out_features, in_features, scale=scale), f"{prefix}.bias": rand(out_features)}

    sd = {}
    for i, (depth, dim, heads, ratio, sr) in enumerate(zip(depths, DIMS, HEADS, MLP_RATIOS, SR_RATIOS, strict=True)):
        in_chans, kernel = (3, 7) if i == 0 else (DIMS[i - 1], 3)
        sd[f"patch_embed{i + 1}.proj.weight"] = rand(dim, in_chans, kernel, kernel)
        sd[f"patch_embed{i + 1}.proj.bias"] = rand(dim)
        sd |= affine(f"patch_embed{i + 1}.norm", dim)
        head_dim, hidden = dim // heads, int(2 * int(dim * ratio) / 3)
        for j in range(depth):
            p = f"block{i + 1}.{j}"
            a = f"{p}.attn"
            sd |= affine(f"{p}.norm1", dim) | affine(f"{p}.norm2", dim)
            sd |= linear(f"{p}.mlp.fc1", 2 * hidden, dim) | linear(f"{p}.mlp.fc2", dim, hidden)
            sd[f"{p}.mlp.dwconv.dwconv.weight"] = rand(hidden, 1, 3, 3, scale=0.3)
            sd[f"{p}.mlp.dwconv.dwconv.bias"] = rand(hidden)
            sd |= linear(f"{a}.proj", dim, dim) | linear(f"{a}.cpb_fc1", 512, 2, scale=1.0)
            sd |= linear(f"{a}.cpb_fc2", heads, 512, scale=0.2)
            sd[f"{a}.temperature"] = math.log(math.expm1(1 / 0.24)) + rand(heads, 1, 1, scale=0.5)
            sd[f"{a}.query_embedding"] = rand(heads, 1, head_dim, scale=0.3)
            if sr == 1:
                sd |= linear(f"{a}.qkv", 3 * dim, dim)
                continue
            sd |= linear(f"{a}.q", dim, dim) | linear(f"{a}.kv", 2 * dim, dim) | affine(f"{a}.norm", dim)
            sd[f"{a}.sr.weight"] = rand(dim, dim, 1, 1)
            sd[f"{a}.sr.bias"] = rand(dim)
            sd[f"{a}.relative_pos_bias_local"] = rand(heads, 9, scale=1.0)
            sd[f"{a}.learnable_tokens"] = rand(heads, head_dim, 9, scale=0.3)
            sd[f"{a}.learnable_bias"] = rand(heads, 1, 9, scale=0.3)
        sd |= affine(f"norm{i + 1}", dim)
    return sd | linear("head", 1000, DIMS[-1])


def official_cpb_table(query_size, key_size, pretrain_size):
    """Unique log-spaced (query, pooled-centre) offsets and each pair's row, built pair by pair."""
    axes = []
    for q_len, k_len, pre in zip(query_size, key_size, pretrain_size, strict=True):
        queries = torch.arange(q_len, dtype=torch.float32)
        centres = F.adaptive_avg_pool1d(queries[None], k_len)[0]
        axes.append((queries, centres, pre))
    (qh, kh, pre_h), (qw, kw, pre_w) = axes
    qy, qx = (t.reshape(-1) for t in torch.meshgrid(qh, qw, indexing="ij"))
    ky, kx = (t.reshape(-1) for t in torch.meshgrid(kh, kw, indexing="ij"))
    pairs = torch.stack(
        [(qy[:, None] - ky[None]) / (pre_h - 1) * 8, (qx[:, None] - kx[None]) / (pre_w - 1) * 8], dim=-1
    ).reshape(-1, 2)
    table, index = torch.unique(pairs, return_inverse=True, dim=0)
    return index, torch.sign(table) * torch.log2(table.abs() + 1) / math.log2(8)


def official_forward(sd, depths, x, img_size, pretrain_size=224):
    sd = {key: value.double() for key, value in sd.items()}

    def norm(t, prefix, eps=1e-6):
        return F.layer_norm(t, t.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=eps)

    def linear(t, prefix):
        return F.linear(t, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    batch = x.shape[0]
    for i, depth in enumerate(depths):
        stride = 4 if i == 0 else 2
        kernel = sd[f"patch_embed{i + 1}.proj.weight"]
        x = F.conv2d(x, kernel, sd[f"patch_embed{i + 1}.proj.bias"], stride=stride, padding=kernel.shape[-1] // 2)
        height, width = x.shape[2:]
        x = norm(x.flatten(2).transpose(1, 2), f"patch_embed{i + 1}.norm", eps=1e-5)
        # sizes and tables fixed at construction (img_size), as the official model does
        side, heads, sr = img_size // 2 ** (i + 2), HEADS[i], SR_RATIOS[i]
        assert (height, width) == (side, side)
        pool = side // sr
        index, table = official_cpb_table((side, side), (pool, pool), (pretrain_size // 2 ** (i + 2),) * 2)
        ones = F.unfold(torch.ones(1, 1, side, side), 3, padding=1)[0]  # (9, N)
        local_len = ones.sum(0)[:, None]
        scale = torch.from_numpy(np.log(local_len.double().numpy() + pool * pool).astype(np.float32))
        padding_mask = ones.t() == 0
        for j in range(depth):
            p, a = f"block{i + 1}.{j}", f"block{i + 1}.{j}.attn"
            tokens, dim = x.shape[1], x.shape[2]
            head_dim = dim // heads
            h = norm(x, f"{p}.norm1")
            cpb = linear(F.relu(linear(table.double(), f"{a}.cpb_fc1")), f"{a}.cpb_fc2").t()[:, index]
            temperature = F.softplus(sd[f"{a}.temperature"])
            if sr == 1:
                q, k, v = linear(h, f"{a}.qkv").reshape(batch, tokens, 3 * heads, head_dim).transpose(1, 2).chunk(3, 1)
                q = (F.normalize(q, dim=-1) + sd[f"{a}.query_embedding"]) * temperature * math.log(side * side)
                attn = q @ F.normalize(k, dim=-1).transpose(-2, -1) + cpb.view(heads, tokens, tokens)
                h = (attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
            else:
                q_norm = F.normalize(
                    linear(h, f"{a}.q").reshape(batch, tokens, heads, head_dim).transpose(1, 2), dim=-1
                )
                q_hat = (q_norm + sd[f"{a}.query_embedding"]) * temperature * scale.double()
                k, v = linear(h, f"{a}.kv").chunk(2, dim=-1)
                k = F.normalize(k.reshape(batch, tokens, heads, head_dim), dim=-1).reshape(batch, tokens, dim)
                kv = torch.cat([k, v], -1).transpose(1, 2).reshape(batch, 2 * dim, side, side)
                kv = F.unfold(kv, 3, padding=1).reshape(batch, 2 * heads, head_dim, 9, tokens).permute(0, 1, 4, 2, 3)
                k_local, v_local = kv.chunk(2, dim=1)
                attn_local = (q_hat.unsqueeze(-2) @ k_local).squeeze(-2) + sd[f"{a}.relative_pos_bias_local"][:, None]
                attn_local = attn_local.masked_fill(padding_mask, float("-inf"))
                pooled = F.conv2d(
                    h.transpose(1, 2).reshape(batch, dim, side, side), sd[f"{a}.sr.weight"], sd[f"{a}.sr.bias"]
                )
                pooled = F.adaptive_avg_pool2d(F.gelu(pooled), pool).reshape(batch, dim, -1).transpose(1, 2)
                pooled = linear(norm(pooled, f"{a}.norm", eps=1e-5), f"{a}.kv")
                k_pool, v_pool = pooled.reshape(batch, -1, 2 * heads, head_dim).transpose(1, 2).chunk(2, dim=1)
                attn_pool = q_hat @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + cpb.view(heads, tokens, -1)
                attn = torch.cat([attn_local, attn_pool], -1).softmax(-1)
                w_local, w_pool = attn.split([9, pool * pool], dim=-1)
                w_local = q_norm @ sd[f"{a}.learnable_tokens"] + sd[f"{a}.learnable_bias"] + w_local
                h = (w_local.unsqueeze(-2) @ v_local.transpose(-2, -1)).squeeze(-2) + w_pool @ v_pool
                h = h.transpose(1, 2).reshape(batch, tokens, dim)
            x = x + linear(h, f"{a}.proj")
            gate, value = linear(norm(x, f"{p}.norm2"), f"{p}.mlp.fc1").chunk(2, dim=-1)
            gate = gate.transpose(1, 2).reshape(batch, -1, side, side)
            gate = F.conv2d(
                gate,
                sd[f"{p}.mlp.dwconv.dwconv.weight"],
                sd[f"{p}.mlp.dwconv.dwconv.bias"],
                padding=1,
                groups=gate.shape[1],
            )
            x = x + linear(F.gelu(gate.flatten(2).transpose(1, 2)) * value, f"{p}.mlp.fc2")
        x = norm(x, f"norm{i + 1}")
        if i < len(depths) - 1:
            x = x.reshape(batch, side, side, -1).permute(0, 3, 1, 2)
    return linear(x.mean(1), "head")


@pytest.mark.parametrize("img_size, depths", [(224, (1, 1, 1, 1)), (160, (1, 1, 1, 1))])
def test_official_checkpoint_loads_and_matches_official_forward(img_size, depths, load_official):
    """At 224 the official model's construction size; at 160 an official model built with img_size=160."""
    official = official_state_dict(depths, torch.Generator().manual_seed(0))
    model = load_official("transnext_micro", {"model": official}, depths=depths).double().eval()
    x = torch.randn(1, 3, img_size, img_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(official, depths, x, img_size), atol=1e-9, rtol=1e-9)


def test_filter_maps_every_official_key_and_drops_size_buffers():
    from visionzoo.backbones.transnext import checkpoint_filter_fn

    depths = (1, 1, 1, 1)
    model = timm.create_model("transnext_micro", depths=depths)
    official = official_state_dict(depths, torch.Generator().manual_seed(0))
    official |= {"relative_pos_index1": torch.zeros(3), "block1.0.attn.seq_length_scale": torch.zeros(3)}
    mapped = checkpoint_filter_fn(official, model)
    assert mapped.keys() == model.state_dict().keys()
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_micro_runs_at_a_detection_size():
    size = (320, 480)
    model = timm.create_model("transnext_micro").eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [tuple(t.shape[2:]) for t in out] == [(-(-size[0] // r), -(-size[1] // r)) for r in (4, 8, 16, 32)]
    assert all(torch.isfinite(t).all() for t in out)
