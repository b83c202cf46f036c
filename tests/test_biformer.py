"""BiFormer fidelity: official configuration and checkpoints (paper figures: ``test_families``).

``official_forward`` re-implements the official forward pass (rayleizhu/BiFormer,
``models/biformer.py`` with ``ops/bra_legacy.py`` and ``models/_common.py::AttentionLePE``)
from the official state-dict keys, gathering the routed regions as the legacy code does, so a
checkpoint loaded through ``checkpoint_filter_fn`` must give the same logits.
"""

import os

import timm
import torch
import torch.nn.functional as F

# depths, embed dims (models/biformer.py); n_win 7, topks 1/4/16/-2, head_dim 32, mlp_ratio 3
# (the forward test uses a shallower biformer_tiny: its full depth only repeats the same blocks, in fp64 slowly)
OFFICIAL = {"biformer_tiny": ((2, 2, 8, 2), (64, 128, 256, 512)), "shallow": ((1, 1, 2, 1), (64, 128, 256, 512))}
TOPKS = (1, 4, 16)
N_WIN = 7


def official_state_dict(name, generator):
    depths, dims = OFFICIAL[name]

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    def bn(prefix, width):
        var = torch.rand(width, generator=generator) + 0.5
        return {
            f"{prefix}.weight": 1 + rand(width),
            f"{prefix}.bias": rand(width),
            f"{prefix}.running_mean": rand(width),
            f"{prefix}.running_var": var,
            f"{prefix}.num_batches_tracked": torch.tensor(100),
        }

    def ln(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width), f"{prefix}.bias": rand(width)}

    def linear(prefix, n_out, n_in, bias=True):
        return {f"{prefix}.weight": rand(n_out, n_in)} | ({f"{prefix}.bias": rand(n_out)} if bias else {})

    def conv(prefix, n_out, n_in, k):
        return {f"{prefix}.weight": rand(n_out, n_in, k, k, scale=0.2), f"{prefix}.bias": rand(n_out)}

    sd = conv("downsample_layers.0.0", dims[0] // 2, 3, 3) | bn("downsample_layers.0.1", dims[0] // 2)
    sd |= conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3) | bn("downsample_layers.0.4", dims[0])
    for i in range(1, 4):
        sd |= conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3) | bn(f"downsample_layers.{i}.1", dims[i])
    for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        for j in range(depth):
            p = f"stages.{i}.{j}"
            sd |= conv(f"{p}.pos_embed", dim, 1, 3) | ln(f"{p}.norm1", dim) | ln(f"{p}.norm2", dim)
            sd |= conv(f"{p}.attn.lepe", dim, 1, 5)
            if i < 3:
                sd |= linear(f"{p}.attn.qkv.qkv", 3 * dim, dim) | linear(f"{p}.attn.wo", dim, dim)
            else:
                sd |= linear(f"{p}.attn.qkv", 3 * dim, dim, bias=False) | linear(f"{p}.attn.proj", dim, dim)
            sd |= linear(f"{p}.mlp.0", 3 * dim, dim) | linear(f"{p}.mlp.3", dim, 3 * dim)
    return sd | bn("norm", dims[-1]) | linear("head", 1000, dims[-1])


def official_forward(name, sd, x):
    depths, dims = OFFICIAL[name]
    sd = {key: value.double() if value.is_floating_point() else value for key, value in sd.items()}

    def bn(t, p):  # NCHW, eval mode
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)

    def linear(t, p):
        return F.linear(t, sd[f"{p}.weight"], sd.get(f"{p}.bias"))

    def conv(t, p, stride=1, groups=1):
        weight = sd[f"{p}.weight"]
        return F.conv2d(t, weight, sd[f"{p}.bias"], stride=stride, padding=weight.shape[-1] // 2, groups=groups)

    def bra(t, p, topk):  # ops/bra_legacy.py, NHWC, H and W multiples of N_WIN
        n, height, width, dim = t.shape
        heads, regions, rh, rw = dim // 32, N_WIN * N_WIN, height // N_WIN, width // N_WIN
        q, kv = linear(t, f"{p}.qkv.qkv").split([dim, 2 * dim], -1)

        def windows(u):  # n (j h) (i w) c -> n (j i) h w c
            return u.reshape(n, N_WIN, rh, N_WIN, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, regions, rh, rw, -1)

        q, kv = windows(q), windows(kv)
        q_win, k_win = q.mean([2, 3]).detach(), kv[..., :dim].mean([2, 3]).detach()
        v_map = kv[..., dim:].reshape(n, N_WIN, N_WIN, rh, rw, dim).permute(0, 5, 1, 3, 2, 4)
        lepe = conv(v_map.reshape(n, dim, height, width), f"{p}.lepe", groups=dim).permute(0, 2, 3, 1)
        index = torch.topk((q_win * dim**-0.5) @ k_win.transpose(-2, -1), topk, dim=-1).indices
        kv_pix = kv.flatten(2, 3)  # n p2 w2 c
        tokens = kv_pix.shape[2]
        sel = torch.gather(
            kv_pix[:, None].expand(-1, regions, -1, -1, -1),
            2,
            index.view(n, regions, topk, 1, 1).expand(-1, -1, -1, tokens, 2 * dim),
        )
        k_sel, v_sel = sel.split([dim, dim], -1)
        k_sel = k_sel.reshape(n * regions, topk * tokens, heads, 32).permute(0, 2, 3, 1)  # (np2, m, c, k w2)
        v_sel = v_sel.reshape(n * regions, topk * tokens, heads, 32).transpose(1, 2)
        q_pix = q.reshape(n * regions, tokens, heads, 32).transpose(1, 2)
        out = ((q_pix * dim**-0.5) @ k_sel).softmax(-1) @ v_sel  # (n p2, m, w2, c)
        out = out.reshape(n, N_WIN, N_WIN, heads, rh, rw, 32).permute(0, 1, 4, 2, 5, 3, 6)
        return linear(out.reshape(n, height, width, dim) + lepe, f"{p}.wo")

    def attention_lepe(t, p):  # models/_common.py AttentionLePE: 8 heads, no qkv bias, LePE on the input
        n, height, width, dim = t.shape
        tokens = t.reshape(n, height * width, dim)
        qkv = linear(tokens, f"{p}.qkv").reshape(n, -1, 3, 8, dim // 8).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (dim // 8) ** -0.5).softmax(-1)
        out = (attn @ qkv[2]).transpose(1, 2).reshape(n, -1, dim)
        lepe = conv(t.permute(0, 3, 1, 2), f"{p}.lepe", groups=dim).flatten(2).transpose(1, 2)
        return linear(out + lepe, f"{p}.proj").reshape(n, height, width, dim)

    x = F.gelu(bn(conv(x, "downsample_layers.0.0", stride=2), "downsample_layers.0.1"))
    x = bn(conv(x, "downsample_layers.0.3", stride=2), "downsample_layers.0.4")
    for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        if i:
            x = bn(conv(x, f"downsample_layers.{i}.0", stride=2), f"downsample_layers.{i}.1")
        for j in range(depth):
            p = f"stages.{i}.{j}"
            x = x + conv(x, f"{p}.pos_embed", groups=dim)
            h = x.permute(0, 2, 3, 1)
            a = ln(h, f"{p}.norm1")
            h = h + (bra(a, f"{p}.attn", TOPKS[i]) if i < 3 else attention_lepe(a, f"{p}.attn"))
            h = h + linear(F.gelu(linear(ln(h, f"{p}.norm2"), f"{p}.mlp.0")), f"{p}.mlp.3")
            x = h.permute(0, 3, 1, 2)
    return linear(bn(x, "norm").flatten(2).mean(-1), "head")


def test_architecture_follows_official_config():
    model = timm.create_model("biformer_tiny")
    mixers = [[type(block.mixer).__name__ for block in stage.blocks] for stage in model.stages]
    assert mixers == [["RoutingAttention"] * 2] * 2 + [["RoutingAttention"] * 8, ["GlobalLePEAttention"] * 2]
    routing = [stage.blocks[0].mixer for stage in model.stages[:3]]
    assert [(m.n_win, m.topk, m.num_heads, m.head_dim) for m in routing] == [
        (7, 1, 2, 32),
        (7, 4, 4, 32),
        (7, 16, 8, 32),
    ]
    assert model.stages[3].blocks[0].mixer.num_heads == 8
    assert model.stages[0].blocks[0].norm1.eps == 1e-6


def test_official_checkpoint_loads_and_matches_official_forward(load_official):
    official = official_state_dict("shallow", torch.Generator().manual_seed(0))
    # in the release's container
    model = load_official("biformer_tiny", {"model": official}, depths=(1, 1, 2, 1)).double().eval()
    torch.testing.assert_close(
        model.stages[2].blocks[1].mixer.proj.weight, official["stages.2.1.attn.wo.weight"].double()
    )
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)  # the official code needs maps divisible by 7
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward("shallow", official, x), atol=1e-9, rtol=1e-9)


def test_pretrained_cfg_points_at_the_official_release():
    model = timm.create_model("biformer_tiny")
    assert model.pretrained_cfg["url"] == "https://matix.li/e36fe9fb086c"
    assert model.pretrained_cfg["tag"] == "in1k"


def test_peak_memory_helper_measures_a_model():
    from visionzoo.bench import model_peak_memory_mib

    peak = model_peak_memory_mib("biformer_tiny", (32, 32))
    assert peak > 0 if os.path.exists("/proc/self/clear_refs") else peak is None
