"""The Transformer and its checkpoints: a naive reference forward, causality, learning, atomic and
validated safetensors I/O."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from h2q import checkpoint
from h2q.config import PRESETS, ModelConfig
from h2q.errors import H2QError
from h2q.model import SPLIT_ROWS, Transformer, linear
from h2q.tokenizer import encode


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny"])


def reference_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The model's maths written out plainly in float64 from its weights: RMSNorm, rotary from the
    formula, attention one head and one query at a time with an explicit softmax, SwiGLU, tied head."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    hs, half = cfg.head_dim, cfg.head_dim // 2

    def rms_norm(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    def rotate(v, pos):  # v (hs,): pair (i, i + hs/2) turns by pos * base^(-2i/hs)
        out = v.clone()
        for i in range(half):
            angle = pos * cfg.rope_base ** (-2 * i / hs)
            c, s = math.cos(angle), math.sin(angle)
            out[i], out[i + half] = v[i] * c - v[i + half] * s, v[i + half] * c + v[i] * s
        return out

    B, T = ids.shape
    x = w["embed.weight"][ids]  # (B, T, C)
    for layer in range(cfg.n_layer):
        p = f"layers.{layer}."
        h = rms_norm(x, w[p + "attn_norm.weight"])
        q, k, v = (h @ w[f"{p}attn.{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj"))
        attn = torch.zeros_like(x)
        for b in range(B):
            for head in range(cfg.n_head):
                cols = slice(head * hs, (head + 1) * hs)
                keys = [rotate(k[b, s, cols], s) for s in range(T)]
                for t in range(T):
                    query = rotate(q[b, t, cols], t)
                    scores = torch.stack([query @ keys[s] / math.sqrt(hs) for s in range(t + 1)])  # causal
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    attn[b, t, cols] = sum(weights[s] * v[b, s, cols] for s in range(t + 1))
        x = x + attn @ w[p + "attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "mlp_norm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, w["norm.weight"]) @ w["embed.weight"].T


def test_forward_matches_naive_reference():
    model = tiny_model().eval()
    with torch.no_grad():  # weights larger than the init's, so attention is far from uniform
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(4.0)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    expected = reference_forward(model, ids)
    with torch.no_grad():
        got = model(ids)
    assert expected.abs().max() > 1.0  # not a near-zero comparison
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 40))
    changed = ids.clone()
    changed[:, 25] = (changed[:, 25] + 1) % 256
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 2), (SPLIT_ROWS + 1, 1), (7,)])
def test_split_linear_equals_f_linear_with_gradients(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, 24, requires_grad=True)
    weight = torch.randn(18, 24, requires_grad=True)
    y = linear(x, weight)
    assert y.shape == (*shape, 18)
    torch.testing.assert_close(y, F.linear(x, weight))
    grads = torch.autograd.grad(y.square().sum(), (x, weight))
    expected = torch.autograd.grad(F.linear(x, weight).square().sum(), (x, weight))
    for got, want in zip(grads, expected):  # sums of ~24 products in another order: fp32 rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_logits_shape_and_config_roundtrip():
    model = tiny_model()
    assert model(torch.zeros(3, 7, dtype=torch.long)).shape == (3, 7, model.config.vocab_size)
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config
    assert model.flops_per_token() > 6 * model.num_params()


@pytest.mark.slow
def test_tiny_model_overfits_short_text():
    """Learning really works: a tiny model memorises a short text to below 0.2 bits per byte."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=64, context_len=128, mlp_hidden=192))
    text = torch.tensor(encode("h2q trains a byte-level transformer offline, then shares it with twenty agents."))
    x, y = text[:-1].unsqueeze(0), text[1:].unsqueeze(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    bits_per_byte = loss.item() / torch.log(torch.tensor(2.0)).item()
    assert bits_per_byte < 0.2


def test_checkpoint_roundtrip_rebuilds_model_alone(tmp_path):
    model = tiny_model()
    checkpoint.save_model(tmp_path, model)
    loaded, meta = checkpoint.load_model(tmp_path)
    assert loaded.config == model.config and meta["tokenizer"] == "bytes-v1"
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(loaded(ids), model.eval()(ids))
    assert loaded.fingerprint == model.fingerprint == model.base_fingerprint()
    fresh = tiny_model()
    assert fresh.fingerprint is None and fresh.quant_scheme is None  # declared, empty until named
    assert fresh.base_fingerprint() == loaded.fingerprint  # the same weights: the same name


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    checkpoint.save_model(tmp_path, model)
    before = (tmp_path / checkpoint.MODEL_FILE).read_bytes()

    def dies_midway(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    monkeypatch.setattr(checkpoint, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(tmp_path, tiny_model(seed=1))
    assert (tmp_path / checkpoint.MODEL_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.MODEL_FILE]  # no temp file left
    checkpoint.load_model(tmp_path)


def test_saved_files_follow_the_umask_of_the_moment(tmp_path):
    old = os.umask(0o027)  # set after h2q was imported: read when writing, not cached at import
    try:
        checkpoint.save_model(tmp_path, tiny_model())
        checkpoint.atomic_write_json(tmp_path / "log.json", {"a": 1})
    finally:
        os.umask(old)
    assert os.umask(old) == old  # writing left the process umask alone
    for name in (checkpoint.MODEL_FILE, "log.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_bad_checkpoint_is_one_clear_error(tmp_path, damage):
    checkpoint.save_model(tmp_path, tiny_model())
    path = tmp_path / checkpoint.MODEL_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        path.unlink()
    with pytest.raises(H2QError) as err:
        checkpoint.load_model(tmp_path)
    assert "\n" not in str(err.value)
