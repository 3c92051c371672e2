"""Plait's CPU products against PyTorch references over every stored weight format: the decode kernels
(float, int16 and int8 x), the panels of more rows (float32, and int16 on AVX-512 VNNI), the MLP's gated
product, and the AMX tile products (bfloat16 and int8) where the CPU has them. The `isa` fixture
(conftest) runs each on AVX2 and again on AVX-512."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.runtime.cpu import kernels, panels
from plait.runtime.cpu.kernels import WeightFormat
from plait.runtime.cpu.linear import Q4_PANEL_MAX_ROWS, CpuLinear, StoredWeight
from tests.cpu_weights import FLOAT_CONSTANTS, float_constant_weight, gguf_weight, needs_kernels, rel_err

@needs_kernels
@pytest.mark.parametrize("fmt", list(WeightFormat), ids=lambda f: f.name)
# the decode kernel's passes, then the panel kernels (blocks of 12 rows on AVX-512: 100 = 8 x 12 + 4)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40, 100])
def test_linear_matches_the_dequantized_product(fmt, rows, isa):
    if rows <= 8 and isa == "avx512":
        pytest.skip("the decode kernels take up to 8 rows")
    torch.manual_seed(rows)
    n, k = 100, 320
    w = torch.randn(n, k)
    if fmt in FLOAT_CONSTANTS:
        data, ref_w = gguf_weight(w, FLOAT_CONSTANTS[fmt])
        made, data = kernels.float_constants(FLOAT_CONSTANTS[fmt], data)
        assert made == fmt and data.shape == (n, fmt.row_bytes(k))
    elif fmt.block_bytes is not None:
        data, ref_w = gguf_weight(w, fmt)
    else:
        dtype = {WeightFormat.F32: torch.float32, WeightFormat.BF16: torch.bfloat16, WeightFormat.F16: torch.float16}[fmt]
        data = w.to(dtype).contiguous()
        ref_w = data.float()
    bias = torch.randn(n)
    x = torch.randn(rows, k)
    out = kernels.linear(x, data, fmt, n, bias=bias)
    assert rel_err(out, x.double() @ ref_w.double().T + bias.double()) < 1e-5
    # The embedding reads rows of the same stored matrix.
    ids = torch.tensor([0, 7, n - 1])
    assert torch.equal(kernels.embedding(ids, data, fmt, k), ref_w[ids])


def block_offsets(data: torch.Tensor, fmt: WeightFormat, n: int, k: int) -> torch.Tensor:
    """The offset `m` of every block of a stored weight, expanded to [n, k] (0 for Q8_0)."""
    blocks = data.view(n, k // 32, fmt.block_bytes).numpy()
    halves = np.ascontiguousarray(blocks[:, :, :4]).view(np.float16).astype(np.float32)  # [n, k/32, 2]
    m = {WeightFormat.Q8_0: 0 * halves[:, :, 0], WeightFormat.Q4_0: -8 * halves[:, :, 0],
         WeightFormat.Q4_1: halves[:, :, 1]}[fmt]
    return torch.from_numpy(m).repeat_interleave(32, dim=1)


# Integer decode products: x rounded per block of 32 to int8 (scale max|x| / 127) or int16 (max|x| /
# 32767); (bounds on the error against the exact product: not rounded at all, and not beyond the step).
INTEGER_DOTS = {"int8": (127, 1e-4, 3e-2), "int16": (32767, 1e-7, 2e-4)}


@needs_kernels
@pytest.mark.parametrize("fmt", [WeightFormat.Q8_0, WeightFormat.Q4_0, WeightFormat.Q4_1], ids=lambda f: f.name)
@pytest.mark.parametrize("rows", [1, 5, 8, 9])
@pytest.mark.parametrize("dot", list(INTEGER_DOTS))
def test_integer_dot_rounds_x_per_block_and_multiplies_exactly(fmt, rows, dot, isa):
    """With an integer `dot`, decode-sized products take x rounded per 32 values times the codes,
    exactly, plus the block offsets times the float x; more rows ignore it (float panels)."""
    torch.manual_seed(rows)
    n, k = 64, 256
    levels, lowest, highest = INTEGER_DOTS[dot]
    data, ref_w = gguf_weight(torch.randn(n, k), fmt)
    x = torch.randn(rows, k) * torch.linspace(0.1, 3, k)
    out = kernels.linear(x, data, fmt, n, dot=dot)
    exact = x.double() @ ref_w.double().T
    if rows > 8:
        assert torch.equal(out, kernels.linear(x, data, fmt, n))
        return
    blocks = x.view(rows, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)  # float32 throughout, as the kernel computes
    xq = (torch.round(blocks * (levels / amax)) * (amax / levels)).view(rows, k)
    offsets = block_offsets(data, fmt, n, k).double()
    expected = xq.double() @ (ref_w.double() - offsets).T + x.double() @ offsets.T
    assert rel_err(out, expected) < 1e-5
    assert lowest < rel_err(out, exact) < highest


@needs_kernels
@pytest.mark.parametrize("fmt", list(FLOAT_CONSTANTS), ids=lambda f: f.name)
@pytest.mark.parametrize("dot", ["float", "int16", "int8"])
def test_float_block_constants_give_bit_identical_products(fmt, dot, isa):
    """Q8_0F / Q4_1F hold the same values as the GGUF blocks they were made from: every product
    (batch-1 and batched decode, the panel kernel, the gated MLP) and every embedding row is equal
    to the bit, so the greedy outputs of a model do not change with the layout."""
    torch.manual_seed(3)
    n, k = 96, 576
    gguf_fmt = FLOAT_CONSTANTS[fmt]
    data, _ = gguf_weight(torch.randn(n, k), gguf_fmt)
    _, repacked = kernels.float_constants(gguf_fmt, data)
    for rows in (1, 2, 3, 8, 9, 40):
        x = torch.randn(rows, k)
        assert torch.equal(kernels.linear(x, repacked, fmt, n, dot=dot), kernels.linear(x, data, gguf_fmt, n, dot=dot))
    ids = torch.arange(n)
    assert torch.equal(kernels.embedding(ids, repacked, fmt, k), kernels.embedding(ids, data, gguf_fmt, k))
    assert kernels.float_constants(WeightFormat.Q4_0, data) == (WeightFormat.Q4_0, data)  # left as it is


@needs_kernels
@pytest.mark.parametrize("dot", ["float", "int16", "int8"])
def test_decode_products_of_a_row_do_not_depend_on_the_batch(dot, isa):
    """A row's product is the same bits alone (the batch-1 kernels) and among up to 8 rows, so a
    request's greedy tokens do not depend on what else is decoding."""
    torch.manual_seed(0)
    data, _ = gguf_weight(torch.randn(96, 320), WeightFormat.Q4_1)
    x = torch.randn(8, 320)
    together = kernels.linear(x, data, WeightFormat.Q4_1, 96, dot=dot)
    for r in range(8):
        assert torch.equal(kernels.linear(x[r:r + 1].contiguous(), data, WeightFormat.Q4_1, 96, dot=dot), together[r:r + 1])


needs_int16_panels = pytest.mark.skipif(not kernels.int16_panels_available(), reason="no AVX-512 VNNI here")


@needs_int16_panels
@pytest.mark.parametrize("fmt", [WeightFormat.Q8_0, WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_1F,
                                 WeightFormat.Q8_0F], ids=lambda f: f.name)
# 6 rows a block: 9 = 6 + 3, 100 = 16 x 6 + 4; K of 18 blocks (two slices of the panel) and of 34 (three);
# 400 rows of K = 1,088 are 870 KB of int16 codes: two chunks of rows (204 + 196)
@pytest.mark.parametrize("rows,k", [(9, 576), (13, 576), (100, 576), (40, 1088), (400, 1088)])
def test_int16_panels_are_the_int16_decode_products(fmt, rows, k):
    """Products of more than 8 rows with panels="int16": x rounded to int16 per block of 32 as the decode
    products round it, exact integer block sums on VNNI, then the block constants: the int16 decode
    products (8 rows at a time) within float32 rounding, with a bias and a partial panel (50 columns);
    a row's result does not depend on its batch."""
    n = 50
    torch.manual_seed(rows)
    if fmt in FLOAT_CONSTANTS:
        data, ref = float_constant_weight(fmt, n, k, rows)
    else:
        data, ref = gguf_weight(torch.randn(n, k), fmt)
    x, bias = torch.randn(rows, k) * torch.linspace(0.1, 3, k), torch.randn(n)
    out = kernels.linear(x, data, fmt, n, bias=bias, dot="int16", panels="int16")
    int16 = torch.cat([kernels.linear(x[i:i + 8].contiguous(), data, fmt, n, bias=bias, dot="int16")
                       for i in range(0, rows, 8)])
    assert rel_err(out, int16) < 2e-6
    exact = x.double() @ ref.double().T + bias.double()
    assert 1e-7 < rel_err(out, exact) < 2e-4  # rounded, within the int16 step
    alone = kernels.linear(x[-1:].expand(9, k).contiguous(), data, fmt, n, bias=bias, dot="int16", panels="int16")
    assert torch.equal(alone[0], out[-1])


@needs_kernels
@pytest.mark.parametrize("fmt", [WeightFormat.Q4_1, WeightFormat.Q4_1F, WeightFormat.Q8_0], ids=lambda f: f.name)
# intermediate sizes: whole panels of 32, a last panel of 8 columns, one of 4 (a tail past the 8-wide activation);
# 400 rows of K = 1,088: two chunks of rows
@pytest.mark.parametrize("rows,k,inter", [(3, 576, 96), (9, 576, 96), (40, 576, 72), (100, 1088, 76), (400, 1088, 76)])
def test_gated_product_is_the_product_then_silu_mul(fmt, rows, k, inter, isa):
    """The MLP's gate/up product with its activation: where the int16 panels run (more than 8 rows, VNNI)
    it never writes the [M, 2I] product, and its output is still that product then silu_mul, to the bit;
    elsewhere the same by construction (decode kernels, or the product then silu_mul)."""
    torch.manual_seed(5)
    data, _ = gguf_weight(torch.randn(2 * inter, k), FLOAT_CONSTANTS.get(fmt, fmt))
    if fmt in FLOAT_CONSTANTS:
        _, data = kernels.float_constants(FLOAT_CONSTANTS[fmt], data)
    x = torch.randn(rows, k)
    for dot, panel_dot in (("int16", "int16"), ("float", "float")):
        fused = kernels.gated_linear(x, data, fmt, inter, dot=dot, panels=panel_dot)
        two_step = kernels.silu_mul(kernels.linear(x, data, fmt, 2 * inter, dot=dot, panels=panel_dot))
        assert torch.equal(fused, two_step), (dot, panel_dot)
    gate = kernels.linear(x, data, fmt, 2 * inter, dot="int16", panels="int16")
    expected = torch.nn.functional.silu(gate[:, :inter]) * gate[:, inter:]
    assert rel_err(kernels.gated_linear(x, data, fmt, inter, dot="int16", panels="int16"), expected) < 1e-6
    with pytest.raises(ValueError, match="does not hold"):
        kernels.gated_linear(x, data, fmt, inter + 32)


@needs_int16_panels
@pytest.mark.parametrize("fmt", [WeightFormat.Q8_0, WeightFormat.Q8_0F], ids=lambda f: f.name)
def test_packed_int16_panels_give_the_same_products(fmt):
    """An 8-bit weight laid out once in the int16 panels' order (as many bytes as its rows, whole panels):
    every product equals the one from the stored rows to the bit (with a bias, a last panel of 6
    columns, two chunks of rows at 400), also through a CpuLinear; 4-bit weights are refused."""
    n, k = 70, 1088
    if fmt in FLOAT_CONSTANTS:
        data, _ = float_constant_weight(fmt, n, k, 7)
    else:
        torch.manual_seed(7)
        data, _ = gguf_weight(torch.randn(n, k), fmt)
    packed = panels.int16_panel_pack(data, fmt, n)
    assert packed.numel() == 3 * (32 * k + 32 * (k // 32) * 4)  # three panels: 32 columns' codes, then d
    bias = torch.randn(n)
    for rows in (1, 2, 8, 9, 40, Q4_PANEL_MAX_ROWS, Q4_PANEL_MAX_ROWS + 1, 400):
        x = torch.randn(rows, k)
        rows_product = kernels.linear(x, data, fmt, n, bias=bias, dot="int16", panels="int16")
        from_panels = kernels.linear(x, data, fmt, n, bias=bias, dot="int16", panels="int16", packed=packed)
        if 2 <= rows <= 8:  # the decode kernel's rounding with the columns in the lanes: other float sums
            assert rel_err(from_panels, rows_product) < 1e-6 and not torch.equal(from_panels, rows_product), rows
        else:  # (9 to Q4_PANEL_MAX_ROWS rows on that path too: the int16 panels' sums in their order)
            assert torch.equal(from_panels, rows_product), rows
    layer = CpuLinear(StoredWeight(data, fmt, n, k))
    layer.stored.decode_dot = layer.stored.panel_dot = "int16"
    x = torch.randn(12, k)
    before = layer(x)
    assert layer.pack_int16_panels() and layer.int16_panels is not None
    assert torch.equal(layer(x), before)
    x = torch.randn(5, k)  # a decode batch through the layer: the panels, with the decode products' rounding
    assert torch.equal(layer(x), kernels.linear(x, data, fmt, n, dot="int16", panels="int16", packed=packed))
    q4, _ = gguf_weight(torch.randn(n, k), WeightFormat.Q4_1)
    with pytest.raises(ValueError, match="8-bit"):
        panels.int16_panel_pack(q4, WeightFormat.Q4_1, n)
    assert not CpuLinear(StoredWeight(q4, WeightFormat.Q4_1, n, k)).pack_int16_panels()
    with pytest.raises(ValueError, match="packed panels"):
        kernels.linear(torch.randn(9, k), data, fmt, n, dot="int16", panels="int16", packed=packed[:-64])


@needs_int16_panels
@pytest.mark.parametrize("fmt", [WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_1F], ids=lambda f: f.name)
# every row count of a group of 8, and 11 = 8 + 3 (two groups); K of 10 and 18 blocks
@pytest.mark.parametrize("rows,k", [(1, 320), (3, 576), (8, 576), (11, 320)])
def test_q4_panel_products_compute_the_int16_decode_rounding(fmt, rows, k):
    """Decode-sized products on a 4-bit weight laid out once in panels of 16 columns (q4_panel_pack:
    0.75 bytes a weight): the int16 decode products over the stored rows within float32 rounding, with
    a bias and a partial panel (50 columns); rounded (not the exact product) but within the int16 steps;
    a row's result does not depend on its batch; through a CpuLinear products of up to Q4_PANEL_MAX_ROWS
    rows take the panels and larger ones do not; 8-bit weights and the wrong sizes are refused."""
    n = 50
    torch.manual_seed(rows)
    if fmt in FLOAT_CONSTANTS:
        data, ref = float_constant_weight(fmt, n, k, rows)
    else:
        data, ref = gguf_weight(torch.randn(n, k), fmt)
    packed = panels.q4_panel_pack(data, fmt, n)
    assert packed.numel() == 4 * (k // 32) * (4 * 64 + 2 * 16 * 4)  # four panels: codes, then d and m a block
    x, bias = torch.randn(rows, k) * torch.linspace(0.1, 3, k), torch.randn(n)
    out = panels.q4_panel_linear(x, packed, n, bias)
    # the rounding of the int16 decode products and panels over the stored rows (x to int16 codes per block
    # of 32 in the code sums, its float block sums times the offsets): the same up to the order of float sums
    assert rel_err(out, kernels.linear(x, data, fmt, n, bias=bias, dot="int16", panels="int16")) < 1e-6
    _, low, high = INTEGER_DOTS["int16"]
    assert low < rel_err(out, x.double() @ ref.double().T + bias.double()) < high
    alone = panels.q4_panel_linear(x[-1:].contiguous(), packed, n, bias)
    assert torch.equal(alone[0], out[-1])
    layer = CpuLinear(StoredWeight(data, fmt, n, k), bias)
    layer.stored.decode_dot = layer.stored.panel_dot = "int16"
    medium, large = torch.randn(Q4_PANEL_MAX_ROWS, k), torch.randn(Q4_PANEL_MAX_ROWS + 1, k)
    before = layer(large)
    assert layer.pack_q4_panels() and layer.q4_panels is not None
    for rows_in in (x[:8].contiguous(), medium):
        assert torch.equal(layer(rows_in), panels.q4_panel_linear(rows_in, packed, n, bias))
    assert torch.equal(layer(large), before)
    q8, _ = gguf_weight(torch.randn(n, k), WeightFormat.Q8_0)
    with pytest.raises(ValueError, match="4-bit"):
        panels.q4_panel_pack(q8, WeightFormat.Q8_0, n)
    assert not CpuLinear(StoredWeight(q8, WeightFormat.Q8_0, n, k)).pack_q4_panels()
    with pytest.raises(ValueError, match="packed panels"):
        panels.q4_panel_linear(x, packed[:-64], n)


@needs_int16_panels
@pytest.mark.parametrize("rows", [1, 5, 8, 11])
def test_q4_panel_gated_product_is_the_product_then_silu_mul(rows):
    """The MLP's gate/up product on the 4-bit panels with its activation (what the decoder stack runs for
    steps of up to 8 rows): the product then silu_mul, to the bit; an intermediate size the panels do not
    split evenly is refused."""
    torch.manual_seed(8)
    inter, k = 96, 576
    data, _ = gguf_weight(torch.randn(2 * inter, k), WeightFormat.Q4_1)
    packed = panels.q4_panel_pack(data, WeightFormat.Q4_1, 2 * inter)
    x = torch.randn(rows, k)
    fused = panels.q4_panel_gated_linear(x, packed, inter)
    assert torch.equal(fused, kernels.silu_mul(panels.q4_panel_linear(x, packed, 2 * inter)))
    with pytest.raises(ValueError, match="multiple of 16"):
        panels.q4_panel_gated_linear(x, packed, inter - 8)


def _int14_model(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The int14 products' rounding in float64: w's rows and x's blocks of 32 rounded to 14-bit codes
    (float32 value times 8191 / max |.|, to nearest even), exact code products, the scales after."""
    def codes(v):
        top = v.abs().amax(-1, keepdim=True)
        inv = torch.where(top > 0, torch.tensor(8191.0) / top, torch.zeros_like(top))
        return torch.round(v * inv).double(), top.double() / 8191
    wc, ws = codes(w)  # [N, K], [N, 1]
    xc, xs = codes(x.reshape(x.shape[0], -1, 32))  # [M, nb, 32], [M, nb, 1]
    sums = torch.einsum("mbk,nbk->mnb", xc, wc.reshape(w.shape[0], -1, 32))  # exact integers
    return (sums * xs.squeeze(-1)[:, None, :]).sum(-1) * ws.T + bias.double()


@needs_int16_panels
@pytest.mark.parametrize("fmt", [WeightFormat.Q8_0, WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_1F,
                                 WeightFormat.Q8_0F], ids=lambda f: f.name)
# groups of 5 rows, 6 to 8 left as two: 9 = 5 + 4, 11 = 5 + 3 + 3, 13 = 5 + 4 + 4, 101 = 19 x 5 + 3 + 3; K of 18
# blocks (two slices) and 34 (three); 400 rows of K = 1,088: two chunks
@pytest.mark.parametrize("rows,k", [(9, 576), (11, 576), (13, 576), (101, 576), (40, 1088), (400, 1088)])
def test_int14_products_compute_their_rounding(fmt, rows, k):
    """Products on a weight rounded once to 14-bit codes per row (int14_pack: 2 bytes a weight, whole
    panels of 32 columns), x to 14 bits per block of 32: the float64 model of that rounding within
    float32 rounding, with a bias and a partial panel (50 columns); no further from the exact product
    than the rounding allows; a row's result does not depend on its batch; through a CpuLinear
    products of more than 8 rows take the packing and decode-sized ones the stored rows."""
    n = 50
    torch.manual_seed(rows)
    if fmt in FLOAT_CONSTANTS:
        data, ref = float_constant_weight(fmt, n, k, rows)
    else:
        data, ref = gguf_weight(torch.randn(n, k), fmt)
    packed = panels.int14_pack(data, fmt, n)
    assert packed.numel() == 2 * (32 * k * 2 + 32 * 4)  # two panels: codes as int16, then the columns' scales
    x, bias = torch.randn(rows, k) * torch.linspace(0.1, 3, k), torch.randn(n)
    out = panels.int14_linear(x, packed, n, bias)
    assert rel_err(out, _int14_model(x, ref, bias)) < 2e-6
    exact = x.double() @ ref.double().T + bias.double()
    assert 1e-5 < rel_err(out, exact) < 1e-3  # rounded, within the 14-bit steps
    alone = panels.int14_linear(x[-1:].expand(9, k).contiguous(), packed, n, bias)
    assert torch.equal(alone[0], out[-1])
    layer = CpuLinear(StoredWeight(data, fmt, n, k), bias)
    layer.stored.decode_dot = layer.stored.panel_dot = "int16"
    small = layer(x[:8])
    assert layer.pack_int14() and layer.int14 is not None
    assert torch.equal(layer(x), out) and torch.equal(layer(x[:8]), small)


@needs_int16_panels
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 100, 400])
def test_int14_gated_product_is_the_product_then_silu_mul(rows):
    """The MLP's gate/up product on the int14 packing with its activation (what the decoder stack runs
    for steps of more than 8 rows): the product then silu_mul, to the bit; the wrong sizes refused."""
    torch.manual_seed(6)
    inter, k = 96, 1088
    data, _ = gguf_weight(torch.randn(2 * inter, k), WeightFormat.Q4_1)
    packed = panels.int14_pack(data, WeightFormat.Q4_1, 2 * inter)
    x = torch.randn(rows, k)
    fused = panels.int14_gated_linear(x, packed, inter)
    assert torch.equal(fused, kernels.silu_mul(panels.int14_linear(x, packed, 2 * inter)))
    with pytest.raises(ValueError, match="gate/up"):
        panels.int14_gated_linear(x, packed, inter - 32)
    with pytest.raises(ValueError, match="block formats"):
        panels.int14_pack(torch.zeros(8, k * 2, dtype=torch.uint8), WeightFormat.BF16, 8)


@needs_kernels
def test_int16_panels_fall_back_to_float_panels_without_vnni(isa):
    """Where the int16 panels cannot run (AVX-512 off, or no VNNI), the flag is ignored: the float32
    panels' product, to the bit; float weight formats ignore it everywhere."""
    torch.manual_seed(1)
    n, k = 40, 320
    data, _ = gguf_weight(torch.randn(n, k), WeightFormat.Q4_1)
    x = torch.randn(20, k)
    float_panels = kernels.linear(x, data, WeightFormat.Q4_1, n)
    int16 = kernels.linear(x, data, WeightFormat.Q4_1, n, panels="int16")
    assert torch.equal(int16, float_panels) != kernels.int16_panels_available()
    w = torch.randn(n, k)
    assert torch.equal(kernels.linear(x, w, WeightFormat.F32, n, panels="int16"), kernels.linear(x, w, WeightFormat.F32, n))
    with pytest.raises(ValueError, match="panel product"):
        kernels.linear(x, data, WeightFormat.Q4_1, n, panels="int8")


@needs_kernels
def test_unknown_decode_product_is_refused():
    with pytest.raises(ValueError, match="int16"):
        kernels.linear(torch.randn(1, 64), torch.zeros(10, 40, dtype=torch.uint8), WeightFormat.Q4_1, 10, dot="int4")


@needs_kernels
def test_linear_refuses_a_weight_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not hold"):
        kernels.linear(torch.randn(2, 64), torch.zeros(10, 36, dtype=torch.uint8), WeightFormat.Q4_1, 10)
    with pytest.raises(ValueError, match="float32"):
        kernels.linear(torch.randn(2, 64).double(), torch.randn(10, 64), WeightFormat.F32, 10)


@needs_kernels
def test_stored_weight_keeps_float_weights_in_16_bits_only_when_lossless():
    exact = torch.randn(8, 64).bfloat16().float()
    assert StoredWeight.from_float(exact).fmt is WeightFormat.BF16
    assert StoredWeight.from_float(torch.randn(8, 64)).fmt is WeightFormat.F32
    assert torch.equal(StoredWeight.from_float(exact).dequantize(), exact)


def test_decode_products_setting_resolves_from_dtype_and_flags():
    """auto: int16 with an automatic dtype, float32 products when the user chose a dtype;
    --enable-cpu-int8-dot means int8; a name the kernels do not know is refused."""
    from plait.runtime.config import ModelConfig
    from plait.runtime.cpu.products import resolve_decode_products

    assert resolve_decode_products(ModelConfig()) == "int16"
    assert resolve_decode_products(ModelConfig(dtype="float32")) == "float"
    assert resolve_decode_products(ModelConfig(dtype="float32", cpu_decode_products="int16")) == "int16"
    assert resolve_decode_products(ModelConfig(enable_cpu_int8_dot=True)) == "int8"
    with pytest.raises(ValueError, match="cpu_decode_products"):
        resolve_decode_products(ModelConfig(cpu_decode_products="int4"))


needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason="no AMX-BF16 here (Intel Xeon since Sapphire Rapids)")


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().double()


@pytest.mark.parametrize("exact", [True, False])
def test_amx_pack_puts_each_weight_in_its_tile_place(exact):
    """amx_pack's layout, read back in Python (no AMX needed): per 32 columns and 32 inputs, the
    tiles [hi, lo] x [columns 0-15, 16-31] of 16 input pairs x 16 columns x 2; N padded with zeros."""
    torch.manual_seed(0)
    n, k = 40, 96
    w = torch.randn(n, k)
    packed = kernels.amx_pack(w, exact)
    parts = 2 if exact else 1
    assert packed.dtype == torch.int16 and packed.numel() == parts * 64 * k
    assert kernels.amx_exact(packed, n, k) == exact
    tiles = packed.view(torch.bfloat16).reshape(2, k // 32, parts, 2, 16, 16, 2)
    hi = w.bfloat16()
    lo = (w - hi.float()).bfloat16()
    for col, inp in [(0, 0), (17, 33), (39, 95), (5, 64)]:
        block, half, c = col // 32, col % 32 // 16, col % 16
        step, pair, e = inp // 32, inp % 32 // 2, inp % 2
        assert tiles[block, step, 0, half, pair, c, e] == hi[col, inp]
        if exact:
            assert tiles[block, step, 1, half, pair, c, e] == lo[col, inp]
    assert torch.all(tiles[1, :, :, 0, :, 8:] == 0) and torch.all(tiles[1, :, :, 1] == 0)  # columns 40..63: padding
    with pytest.raises(ValueError, match="does not hold"):
        kernels.amx_exact(packed.flatten()[:-1], n, k)


def test_prefill_attention_setting_resolves_from_the_cpu_dtype_and_products():
    """auto: integer attention where AVX-512 VNNI runs and the dtype is automatic, unless the products
    are on AMX (which takes the attention too); asking for int16 where it cannot run, or for an
    unknown name, is a clear error."""
    from plait.runtime.config import ModelConfig
    from plait.runtime.cpu.products import resolve_prefill_attention

    int16 = kernels.int16_attention_available(64)
    assert resolve_prefill_attention(ModelConfig(), "int16", 64) == ("int16" if int16 else "float")
    assert resolve_prefill_attention(ModelConfig(), "float", 64) == ("int16" if int16 else "float")
    assert resolve_prefill_attention(ModelConfig(), "amx", 64) == "amx"
    assert resolve_prefill_attention(ModelConfig(dtype="float32"), "float", 64) == "float"
    assert resolve_prefill_attention(ModelConfig(), "int16", 80) == "float"  # a head size it does not take
    assert resolve_prefill_attention(ModelConfig(cpu_prefill_attention="float"), "int16", 64) == "float"
    if int16:
        assert resolve_prefill_attention(ModelConfig(dtype="float32", cpu_prefill_attention="int16"), "float",
                                         64) == "int16"
    else:
        with pytest.raises(ValueError, match="VNNI"):
            resolve_prefill_attention(ModelConfig(cpu_prefill_attention="int16"), "float", 64)
    with pytest.raises(ValueError, match="head size 80"):
        resolve_prefill_attention(ModelConfig(cpu_prefill_attention="int16"), "float", 80)
    with pytest.raises(ValueError, match="cpu_prefill_attention"):
        resolve_prefill_attention(ModelConfig(cpu_prefill_attention="bf16"), "float", 64)


@needs_amx
@pytest.mark.parametrize("rows", [9, 33, 100])
def test_amx_products_are_near_the_float32_product(rows):
    """Three bfloat16 passes over the hi/lo parts: within 2^-14 of the exact product (float32 panel
    products: ~1e-6); one pass (amx-bf16) is the product of the bfloat16-rounded x and w."""
    torch.manual_seed(rows)
    n, k = 72, 320
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    exact_ref = x.double() @ w.double().T + bias.double()
    out = kernels.amx_linear(x, kernels.amx_pack(w), n, bias)
    assert rel_err(out, exact_ref) < 2**-14
    out_bf16 = kernels.amx_linear(x, kernels.amx_pack(w, exact=False), n, bias)
    assert rel_err(out_bf16, bf16(x) @ bf16(w).T + bias.double()) < 1e-6
    assert rel_err(out_bf16, exact_ref) > 2**-14  # it is the coarser product, not the exact one
    # a row's result does not depend on the rows around it (padding to 32 rows, blocks of 32)
    alone = kernels.amx_linear(x[-1:].contiguous(), kernels.amx_pack(w), n, bias)
    assert torch.equal(alone[0], out[-1])


@needs_amx
def test_large_amx_products_split_rows_between_threads_without_changing_them():
    """x's parts over 1.5 MiB (here 320 rows x 1536 inputs): each thread takes a share of the rows and
    every weight tile rather than a share of the columns; the sums are the same to the bit (each
    32 x 32 block runs the same steps), partial column blocks and the bias included."""
    torch.manual_seed(3)
    n, k, rows = 200, 1536, 300
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    packed = kernels.amx_pack(w)
    out = kernels.amx_linear(x, packed, n, bias)
    assert rel_err(out, x.double() @ w.double().T + bias.double()) < 2**-14
    for first in (0, 64, 256):  # rows alone, under the split's threshold
        part = kernels.amx_linear(x[first:first + 32].contiguous(), packed, n, bias)
        assert torch.equal(part, out[first:first + 32])


@needs_kernels
def test_amx_int8_pack_puts_each_code_and_constant_in_its_place():
    """Per 16 columns and block: byte [i][column][e] holds the codes of inputs 4i + e (low nibble) and
    16 + 4i + e (high), then the 16 columns' d and m; columns past N are zeros."""
    n, k = 20, 64
    stored, ref = float_constant_weight(WeightFormat.Q4_1F, n, k, 0)
    packed = kernels.amx_int8_pack(stored, WeightFormat.Q4_1F, n, k)
    assert packed.shape == (2, 2, kernels.AMX_INT8_PACK_BYTES[WeightFormat.Q4_1F])
    blocks = stored.view(n, k // 32, 24)
    d = blocks[:, :, 0:4].contiguous().view(torch.float32)[..., 0]
    m = blocks[:, :, 4:8].contiguous().view(torch.float32)[..., 0]
    for col in (0, 7, 15, 16, 19):
        for b in range(k // 32):
            g, c = col // 16, col % 16
            record = packed[g, b]
            codes = torch.cat([record[:256].view(4, 16, 4)[:, c] & 0x0F, record[:256].view(4, 16, 4)[:, c] >> 4])
            consts = record[256:].contiguous().view(torch.float32)
            assert consts[c] == d[col, b] and consts[16 + c] == m[col, b]
            # the codes give back the weight: w = d * code + m
            assert torch.equal(d[col, b] * codes.flatten().float() + m[col, b], ref[col, b * 32:(b + 1) * 32])
    assert torch.all(packed[1, :, :256].view(-1, 4, 16, 4)[:, :, 4:] == 0)  # columns 20..31
    assert torch.all(packed[1, :, 256:].contiguous().view(torch.float32).view(-1, 2, 16)[:, :, 4:] == 0)


needs_amx_int8 = pytest.mark.skipif(not kernels.amx_int8_available(), reason="no AMX-INT8 here")


@needs_amx_int8
@pytest.mark.parametrize("fmt", [WeightFormat.Q4_1F, WeightFormat.Q8_0F], ids=lambda f: f.name)
@pytest.mark.parametrize("rows", [3, 16, 33, 64])
def test_amx_int8_products_are_the_int16_decode_products(fmt, rows):
    """On AMX's int8 tiles: x rounded to int16 per block, exact integer block sums, then the block
    constants: the int16 decode products' arithmetic (which take 8 rows at a time), within float32
    rounding, bias and a partial column group included; a row's result does not depend on its batch."""
    n, k = 50, 320
    stored, ref = float_constant_weight(fmt, n, k, rows)
    packed = kernels.amx_int8_pack(stored, fmt, n, k)
    x, bias = torch.randn(rows, k) * torch.linspace(0.1, 3, k), torch.randn(n)
    out = kernels.amx_int8_linear(x, packed, n, bias)
    int16 = torch.cat([kernels.linear(x[i:i + 8].contiguous(), stored, fmt, n, bias=bias, dot="int16")
                       for i in range(0, rows, 8)])
    assert rel_err(out, int16) < 2e-6
    exact = x.double() @ ref.double().T + bias.double()
    assert rel_err(out, exact) < 2e-4 and rel_err(int16, exact) < 2e-4
    alone = kernels.amx_int8_linear(x[-1:].contiguous().expand(3, k).contiguous(), packed, n, bias)
    assert torch.equal(alone[0], out[-1])
    with pytest.raises(ValueError, match="does not hold"):
        kernels.amx_int8_linear(x, packed[:-1], n, bias)


@needs_kernels
def test_amx_int8_pack_refuses_other_formats():
    with pytest.raises(ValueError, match="Q4_1F or Q8_0F"):
        kernels.amx_int8_pack(torch.zeros(16, 18, dtype=torch.uint8), WeightFormat.Q4_0, 16, 32)


def test_prefill_products_setting_resolves_from_the_cpu_and_dtype():
    """auto: AMX where the CPU has it and the dtype is automatic, float32 panels otherwise; asking for
    AMX where it cannot run is a clear error; unknown names are refused."""
    from plait.runtime.config import ModelConfig
    from plait.runtime.cpu.products import resolve_prefill_products

    amx, int16 = kernels.amx_available(), kernels.int16_panels_available()
    assert resolve_prefill_products(ModelConfig()) == ("amx" if amx else "int14" if int16 else "float")
    assert resolve_prefill_products(ModelConfig(dtype="float32")) == "float"
    assert resolve_prefill_products(ModelConfig(cpu_prefill_products="float")) == "float"
    for name in ("int14", "int16"):
        if int16:
            assert resolve_prefill_products(ModelConfig(cpu_prefill_products=name)) == name
        else:
            with pytest.raises(ValueError, match="VNNI"):
                resolve_prefill_products(ModelConfig(cpu_prefill_products=name))
    for name in ("amx", "amx-bf16"):
        if amx:
            assert resolve_prefill_products(ModelConfig(cpu_prefill_products=name)) == name
        else:
            with pytest.raises(ValueError, match="AMX"):
                resolve_prefill_products(ModelConfig(cpu_prefill_products=name))
    with pytest.raises(ValueError, match="cpu_prefill_products"):
        resolve_prefill_products(ModelConfig(cpu_prefill_products="tf32"))


@needs_amx
def test_amx_products_stay_off_when_their_packed_weights_would_not_fit(monkeypatch):
    """auto packs the weights for AMX (4 bytes a weight beside the stored ones) only when that takes
    at most half the memory available; otherwise the float32 panels run, and the log says why."""
    from plait.runtime.engine import Engine
    from plait.runtime.executor import model_runner

    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: 256 << 20)  # 256 MiB free
    with Engine(device="cpu", max_total_tokens=2048) as engine:
        assert engine.runner.execution["prefill_products"] == "float"
        assert engine.generate(["The capital of France is"], {"max_new_tokens": 4, "temperature": 0})[0]["output_ids"]
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: 64 << 30)
    with Engine(device="cpu", max_total_tokens=2048) as engine:
        assert engine.runner.execution["prefill_products"] == "amx"
