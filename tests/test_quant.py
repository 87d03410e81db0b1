"""Weight-only quantization: packing, error bounds, logits close to float, checkpoints that reload
exactly, LoRA over a frozen quantized base, GPTQ, and clear errors for impossible settings."""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from h2q import checkpoint, gptq, lora, quant
from h2q.cli import run_main
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.model import Transformer

ROOT = checkpoint.Path(__file__).resolve().parents[1]


def model_of(preset="tiny", seed=0):
    torch.manual_seed(seed)
    return Transformer(PRESETS[preset]).eval()


def random_ids(B=2, T=48, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def weight_with_outliers(N=64, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[torch.rand(N, K, generator=g) < 0.01] *= 20  # a few large weights, as trained models have
    return w


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    q[0, :4] = torch.tensor([0, 15, 15, 0], dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert packed[0, 0] == 0xF0 and packed[0, 1] == 0x0F  # element 2j low nibble, 2j+1 high
    assert torch.equal(quant.unpack_int4(packed), q)


@pytest.mark.parametrize("clip_search", [False, True])
def test_error_within_half_a_step_inside_the_grid(clip_search):
    """Round to nearest: a weight inside its grid's range [code min, code max] comes back within s/2
    (plus float rounding of the arithmetic); a weight outside it comes back as the nearest end."""
    w = weight_with_outliers()
    q8, s8 = quant.quantize_int8(w, clip_search)
    q4, s4, z4 = quant.quantize_int4(w, 32, clip_search)
    per_element = lambda t: t.float().repeat_interleave(32, 1)  # (N, K/32) -> (N, K)
    cases = [  # (reconstruction, scale per element, grid low end, grid high end)
        (quant.dequantize_int8(q8, s8), s8[:, None].expand_as(w), -127 * s8[:, None], 127 * s8[:, None]),
        (quant.dequantize_int4(q4, s4, z4, 32), per_element(s4), per_element(z4 - 8 * s4.float()),
         per_element(z4 + 7 * s4.float())),
    ]
    for deq, scale, low, high in cases:
        slack = 1e-6 * w.abs().max()
        inside = (w >= low) & (w <= high)
        assert inside.float().mean() > 0.5  # the check below is not vacuous
        assert ((w - deq).abs()[inside] <= scale[inside] / 2 + slack).all()
        nearest_end = torch.where(w < low, low, high)
        assert torch.allclose(deq[~inside], nearest_end[~inside], atol=slack)
        if not clip_search:  # plain round-to-nearest spans each row's / group's range up to scale rounding
            assert ((w - deq).abs() <= scale * 0.51 + slack).all()


def test_clip_search_lowers_reconstruction_error():
    w = weight_with_outliers()
    for mode in ("int8", "int4"):
        errors = []
        for clip_search in (False, True):
            if mode == "int8":
                deq = quant.dequantize_int8(*quant.quantize_int8(w, clip_search))
            else:
                deq = quant.dequantize_int4(*quant.quantize_int4(w, 64, clip_search), 64)
            errors.append((deq - w).square().sum())
        assert errors[1] < errors[0], mode


def test_int8_logits_close_to_float_and_int4_reasonable():
    model = model_of("tiny")
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).flatten()
        for mode, group, floor in (("int8", 64, 0.999), ("int4", 32, 0.99)):
            q = quant.quantize(copy.deepcopy(model), mode, group)
            assert F.cosine_similarity(q(ids).flatten(), ref, dim=0) >= floor, mode


def test_swap_keeps_names_buffers_not_parameters_and_fingerprint():
    model = model_of()
    fp, names = model.base_fingerprint(), {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    float_bytes = quant.model_bytes(model)
    quant.quantize(model, "int4", 32)
    swapped = {n for n, m in model.named_modules() if isinstance(m, quant.Int4Linear)}
    assert swapped == names and not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.embed, nn.Embedding)  # stays float unless asked
    assert all(p.is_floating_point() for p in model.parameters())  # codes and scales are buffers
    assert model.fingerprint == fp and model.base_fingerprint() == fp and model.quant_scheme.mode == "int4"
    layer = model.layers[0].mlp.up_proj  # (96, 32): packed bytes + bf16 scale and zero per group of 32
    assert sum(t.numel() * t.element_size() for t in layer.buffers()) == 96 * 16 + 2 * 2 * 96 * 1
    assert quant.model_bytes(model) < float_bytes
    assert quant.describe(model) == "int4 g32 clip-search" and quant.describe(model_of()) == "float32"


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32)])
def test_kernel_and_dequantize_paths_agree(mode, group):
    model = quant.quantize(model_of(), mode, group)
    ids = random_ids()
    with torch.no_grad():
        kernel = model(ids)
        quant.use_kernels(model, False)
        reference = model(ids)
    assert F.cosine_similarity(kernel.flatten(), reference.flatten(), dim=0) > 0.9999  # bf16 activations


def test_int4_kernel_layout_reads_back_canonical_exactly():
    linear = nn.Linear(128, 96, bias=False)
    codes, scales, zeros = quant.quantize_int4(linear.weight.detach(), 64)
    canonical = {"qweight": quant.pack_int4(codes), "scales": scales, "zeros": zeros}
    layer = quant.Int4Linear.from_float(linear, 64)
    if layer.kernel_qweight is None:
        pytest.skip("this torch build has no CPU int4 kernel")
    assert layer.qweight is None  # converted once, when the weights arrived: one copy held
    assert all(torch.equal(canonical[k], v) for k, v in layer.state_dict().items())
    assert torch.equal(layer.dequantize(), quant.dequantize_int4(codes, scales, zeros, 64))
    layer.to("cpu")  # a device move passes through the canonical form and comes back to the kernel's
    assert layer.qweight is None and all(torch.equal(canonical[k], v) for k, v in layer.state_dict().items())
    quant.use_kernels(layer, False)
    assert layer.kernel_qweight is None and all(torch.equal(canonical[k], getattr(layer, k)) for k in canonical)
    quant.use_kernels(layer, True)
    assert layer.qweight is None


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32)])
def test_forward_only_reads_the_layers(mode, group):
    """No layout work hides in forward: quantize leaves every buffer as serving uses it."""
    model = quant.quantize(model_of(), mode, group)
    before = {name: (t.data_ptr(), t._version) for name, t in model.named_buffers()}
    with torch.no_grad():
        model(random_ids())
    assert {name: (t.data_ptr(), t._version) for name, t in model.named_buffers()} == before


@pytest.mark.parametrize("mode,group,embedding", [("int8", 64, False), ("int4", 32, True)])
def test_saved_and_loaded_gives_identical_logits(tmp_path, mode, group, embedding):
    float_dir, out = tmp_path / "base", tmp_path / "base-q"
    checkpoint.save_model(float_dir, model_of())
    model, meta = checkpoint.load_model(float_dir)
    quant.quantize(model, mode, group, embedding=embedding)
    ids = random_ids()
    with torch.no_grad():
        in_memory = model(ids)
    checkpoint.save_quantized(out, model, meta)
    loaded, loaded_meta = checkpoint.load_model(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids), in_memory)
    assert loaded.fingerprint == meta["fingerprint"] and loaded_meta["config"] == meta["config"]
    assert loaded.quant_scheme == model.quant_scheme
    layouts = lambda m: [x.kernel_qweight is None for x in m.modules() if isinstance(x, quant.Int4Linear)]
    assert layouts(loaded) == layouts(model)  # the kernel layout is set at load, as at quantize
    assert quant.QuantScheme.from_json(loaded_meta["quant"]).embedding is embedding


def test_lora_trains_over_quantized_base_and_base_never_changes():
    """QLoRA: float adapter over frozen int4 codes; gradients reach every adapter tensor (through the
    quantized layers' inputs too), the base's packed weights stay bit-identical."""
    model = lora.freeze_base(quant.quantize(model_of(), "int4", 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = lora.LoraAdapter(model, lora.LoraConfig(r=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in adapter.lora_B:
            b.normal_(0, 0.01)  # nonzero B, so A's gradient is not zero by construction
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    ids = random_ids(seed=2)
    loss = F.cross_entropy(model(ids[:, :-1], adapters=adapter).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("cls,args", [(quant.Int8Linear, ()), (quant.Int4Linear, (32,))])
def test_input_gradient_matches_dequantized_linear(cls, args):
    layer = cls.from_float(nn.Linear(64, 48, bias=False), *args)
    x, upstream = torch.randn(5, 64, requires_grad=True), torch.randn(5, 48)
    (layer(x) * upstream).sum().backward()  # d/dx = upstream @ W, whatever the forward's rounding
    assert torch.allclose(x.grad, upstream @ layer.dequantize(), rtol=1e-5, atol=1e-6)


def test_gptq_lowers_output_error_on_calibration_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 128, generator=g) @ (torch.eye(128) + 0.2 * torch.randn(128, 128, generator=g))
    W = weight_with_outliers(48, 128)
    scheme = quant.QuantScheme("int4", 32)
    codes, s, z = gptq.gptq_weight(W, X.t() @ X, scheme)
    compensated = quant.dequantize_int4(codes.to(torch.uint8), s.bfloat16(), z.bfloat16(), 32)
    rtn = quant.dequantize_int4(*quant.quantize_int4(W, 32), 32)
    assert (X @ (compensated - W).t()).square().mean() < 0.8 * (X @ (rtn - W).t()).square().mean()


def test_gptq_model_is_an_ordinary_quantized_model():
    model = model_of()
    calibration = [random_ids(2, 32, seed=s) for s in range(2)]
    gptq.quantize(model, calibration, "int4", 32)
    assert model.quant_scheme.gptq and isinstance(model.layers[1].attn.o_proj, quant.Int4Linear)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids())).all()


def test_impossible_settings_are_user_errors():
    model = model_of()  # tiny: d_model 32
    message = "^group_size 64 does not divide the input size 32 of layers.0.attn.q_proj; use 32$"
    with pytest.raises(H2QError, match=message):
        quant.quantize(model, "int4", 64)
    assert isinstance(model.layers[0].attn.q_proj, nn.Linear)  # nothing was swapped
    with pytest.raises(H2QError, match="group_size 48"):
        quant.quantize(model, "int4", 48)
    with pytest.raises(H2QError, match="mode 'int2'"):
        quant.quantize(model, "int2")
    quant.quantize(model, "int8")
    with pytest.raises(H2QError, match="already quantized"):
        quant.quantize(model, "int8")
    with pytest.raises(H2QError, match="cannot read"):
        quant.QuantScheme.from_json('{"format": "h2q-quant-v0", "mode": "int8"}')


def test_quantize_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts" / "quantize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    checkpoint.save_model(tmp_path / "base", model_of())
    args = ["--ckpt", str(tmp_path / "base"), "--mode", "int4"]
    assert run_main(script.main, args + ["--group-size", "32", "--out", str(tmp_path / "q")]) == 0
    model, meta = checkpoint.load_model(tmp_path / "q")
    assert quant.quant_scheme(model).group_size == 32 and "g32" in capsys.readouterr().out
    assert run_main(script.main, args + ["--out", str(tmp_path / "q2")]) == 2  # default group 64 > d_model 32
    assert capsys.readouterr().err.startswith("error: --group-size 64 does not divide")
