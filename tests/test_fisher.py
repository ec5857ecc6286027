"""Loss-aware Hessians (`hessian: fisher`, GuidedQuant): the token weights are the squared loss
gradients at each layer's output (checked against autograd on the whole model), the weighted
accumulator is the weighted covariance, the walker hands each layer its own weighted Hessian,
GPTQ on it lowers the loss-weighted objective it stands for, the artifact records it, loads back and
is deterministic, and it is refused where it cannot work."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algos.gptq import GPTQConfig, gptq_quantize
from lowbit.artifact import load, read_header
from lowbit.calib.fisher import fisher_token_weights
from lowbit.calib.hessian import HessianAccumulator
from lowbit.calib.walker import accumulate_hessians
from lowbit.formats import GroupLayout, get_format
from lowbit.models import find_linears, load_model
from lowbit.pipeline import quantize, save_job
from lowbit.recipe import Recipe, RecipeError
from lowbit.stream.quantize import StreamError, stream_quantize


def _ids(batches: int = 2, batch: int = 2, seq: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 4096, (batch, seq), generator=g) for _ in range(batches)]


def _output_grad_norms(model, window: torch.Tensor, name: str) -> torch.Tensor:
    """||dL/dy_t||^2 at layer `name`'s output for one window, by plain autograd (parameters included)."""
    layer = dict(model.named_modules())[name]
    outs = []

    def keep(_m, _a, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    handle = layer.register_forward_hook(keep)
    try:
        logits = model(input_ids=window, use_cache=False).logits
        F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum").backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return outs[0].grad[0].pow(2).sum(-1)


def test_token_weights_are_the_squared_output_gradients(tiny_llama):
    model = load_model(str(tiny_llama)).model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = set(find_linears(model))
    batches = _ids()
    weights = fisher_token_weights(model, batches, names)
    assert set(weights) == names and all(len(w) == len(batches) for w in weights.values())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert weights[name][1].shape == (2, 12)
        for row in range(2):
            ref = _output_grad_norms(model, batches[1][row:row + 1], name)
            torch.testing.assert_close(weights[name][1][row], ref, rtol=1e-4, atol=1e-10)
        assert float(weights[name][1][:, -1].abs().max()) == 0.0  # the last token predicts nothing
        assert float(weights[name][1][:, :-1].min()) > 0.0
    # parameters untouched, no parameter gradients formed
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


def test_weighted_accumulator_is_the_weighted_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.rand(3, 5, generator=g) * 4
    acc = HessianAccumulator(16)
    acc.add(x[:2], w[:2])
    acc.add(x[2:], w[2:])
    flat, fw = x.reshape(-1, 16).double(), w.reshape(-1).double()
    ref = 2 * (flat * fw[:, None]).T @ flat / fw.sum()
    torch.testing.assert_close(acc.hessian(), ref.to(acc.hessian().dtype), rtol=1e-5, atol=1e-6)
    # equal weights give GPTQ's plain H, whatever their value
    plain, weighted = HessianAccumulator(16), HessianAccumulator(16)
    plain.add(x)
    weighted.add(x, torch.full((3, 5), 7.0))
    torch.testing.assert_close(weighted.hessian(), plain.hessian(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="token weights"):
        acc.add(x, w[:, :4])


def test_walker_weights_each_layer_by_its_own_gradients(tiny_llama):
    """q/k/v read one input tensor but get different Hessians: each layer's tokens carry its own weights."""
    model = load_model(str(tiny_llama)).model.eval()
    block = model.model.layers[0]
    prefix = "model.layers.0"
    names = {f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 6, 64, generator=g) for _ in range(2)]
    weights = {n: [torch.rand(2, 6, generator=g) for _ in range(2)] for n in names}
    pos = torch.arange(6)[None]
    emb = model.model.rotary_emb(inputs[0], pos)

    def run() -> None:
        for x in inputs:
            block(x, position_embeddings=emb, attention_mask=None, position_ids=pos)

    hs = accumulate_hessians(block, prefix, names, run, token_weights=weights)
    xs = torch.cat([x.reshape(-1, 64) for x in inputs]).double()  # the block's norm comes first: recompute
    normed = torch.cat([block.input_layernorm(x).reshape(-1, 64) for x in inputs]).double()
    assert not torch.allclose(normed, xs)
    for n in names:
        tw = torch.cat([w.reshape(-1) for w in weights[n]]).double()
        ref = 2 * (normed * tw[:, None]).T @ normed / tw.sum()
        torch.testing.assert_close(hs[n].double(), ref, rtol=1e-4, atol=1e-6)
    q, k = hs[f"{prefix}.self_attn.q_proj"], hs[f"{prefix}.self_attn.k_proj"]
    assert not torch.allclose(q, k)


def test_gptq_on_the_weighted_hessian_lowers_the_weighted_objective():
    """A few tokens carry most of the loss gradient and come from a different input distribution:
    GPTQ solving for the weighted H beats GPTQ on the plain H on the objective sum_t w_t ||dW x_t||^2."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(4096, 64, generator=g)
    heavy = torch.rand(4096, generator=g) < 0.05
    x[heavy] = torch.randn(int(heavy.sum()), 64, generator=g) * torch.linspace(0.1, 3, 64)
    tw = torch.where(heavy, 50.0, 0.2)
    plain, weighted = HessianAccumulator(64), HessianAccumulator(64)
    plain.add(x)
    weighted.add(x, tw)
    grid, layout = get_format("int3"), GroupLayout(48, 64, 32)

    def objective(q) -> float:
        d = (w - q.dequantize()) @ x.T  # [out, tokens]
        return float((d.pow(2).sum(0) * tw).sum())

    q_plain = gptq_quantize(w, plain.hessian().float(), grid, layout, GPTQConfig())
    q_fisher = gptq_quantize(w, weighted.hessian().float(), grid, layout, GPTQConfig())
    assert objective(q_fisher) < 0.9 * objective(q_plain)


def _recipe(calib_text, **extra) -> Recipe:
    return Recipe.from_dict({"method": "gptq", "format": "int3", "group_size": 32,
                             "calib": {"path": str(calib_text), "n_samples": 4, "seq_len": 64}, **extra})


def test_artifact_records_fisher_loads_and_is_deterministic(tiny_llama, calib_text, tmp_path):
    r = _recipe(calib_text, hessian="fisher")
    assert r.to_dict()["hessian"] == "fisher" and "hessian" not in _recipe(calib_text).to_dict()
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    assert read_header(path)["recipe"]["hessian"] == "fisher"
    plain = quantize(str(tiny_llama), _recipe(calib_text), show_progress=False)
    name = "model.layers.0.mlp.up_proj"
    assert job.report.modules[name]["bpw"] == plain.report.modules[name]["bpw"]
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)
        # the weighting changed what GPTQ chose
        assert not torch.equal(job.loaded.model(input_ids=ids).logits, plain.loaded.model(input_ids=ids).logits)
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    for f in ("lowbit.json", "quantized.safetensors", "dense.safetensors"):
        assert (path / f).read_bytes() == (again / f).read_bytes()


def test_refused_where_it_cannot_work(tiny_llama, calib_text, tmp_path):
    from lowbit.quantize import QuantizeError

    with pytest.raises(RecipeError, match="'hessian'"):
        Recipe.from_dict({"hessian": "kfac"})
    with pytest.raises(QuantizeError, match="hessian: fisher.*RTN"):
        quantize(str(tiny_llama), _recipe(calib_text, method="rtn", hessian="fisher"), show_progress=False)
    with pytest.raises(StreamError, match="hessian: fisher"):
        stream_quantize(str(tiny_llama), _recipe(calib_text, hessian="fisher"), tmp_path / "s")


def test_cli_flag_sets_the_recipe_key():
    from lowbit.cli import build_recipe

    args = dict(recipe_file=None, method="gptq", fmt=None, bits=None, group_size=None, symmetric=None, calib=None,
                n_samples=None, seq_len=None, act_order=None, damp=None, ignore=None)
    assert build_recipe(**args, hessian="fisher").hessian == "fisher"
    assert build_recipe(**args).hessian == "inputs"


# --- GuidedQuant's output-channel groups (`hessian_groups`) ---

def test_row_groups_cover_the_rows_in_near_equal_ranges():
    from lowbit.calib.hessian import row_groups

    for out, k in ((10, 3), (576, 4), (7, 7), (3, 8)):
        parts = row_groups(out, k)
        assert parts[0].start == 0 and parts[-1].stop == out
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        sizes = [p.stop - p.start for p in parts]
        assert len(parts) == min(k, out) and max(sizes) - min(sizes) <= 1


def test_grouped_token_weights_split_the_layer_weights(tiny_llama):
    """Per group, the squared gradient summed over that group's output channels: the groups add up
    to the single-group weight, and each equals autograd's on those channels."""
    from lowbit.calib.hessian import row_groups

    model = load_model(str(tiny_llama)).model.eval()
    names = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    batches = _ids()
    whole = fisher_token_weights(model, batches, names)
    grouped = fisher_token_weights(model, batches, names, groups=3)
    for n in names:
        assert grouped[n][0].shape == (2, 12, 3)
        torch.testing.assert_close(grouped[n][1].sum(-1), whole[n][1], rtol=1e-5, atol=1e-10)
    layer = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    outs = []

    def keep(_m, _a, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    handle = layer.register_forward_hook(keep)
    window = batches[0][1:2]
    logits = model(input_ids=window, use_cache=False).logits
    F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum").backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    g2 = outs[0].grad[0].pow(2)  # [seq, out]
    for k, rows in enumerate(row_groups(g2.shape[-1], 3)):
        torch.testing.assert_close(grouped["model.layers.1.mlp.down_proj"][0][1, :, k], g2[:, rows].sum(-1),
                                   rtol=1e-4, atol=1e-10)


def test_grouped_accumulator_is_each_groups_weighted_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.rand(3, 5, 4, generator=g) * 4
    acc = HessianAccumulator(16, groups=4)
    acc.add(x[:2], w[:2])
    acc.add(x[2:], w[2:])
    h = acc.hessian()
    assert h.shape == (4, 16, 16)
    flat = x.reshape(-1, 16).double()
    for k in range(4):
        fw = w[..., k].reshape(-1).double()
        torch.testing.assert_close(h[k].double(), 2 * (flat * fw[:, None]).T @ flat / fw.sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="group"):
        acc.add(x, w[..., :3])


def test_gptq_on_grouped_hessians_lowers_the_channelwise_objective():
    """Two halves of the output channels care about different tokens (their loss gradients live on
    different tokens, whose inputs are correlated differently): one Hessian per half beats the
    single weighted Hessian on the objective sum_t sum_j g_tj^2 (dW_j x_t)^2 that GuidedQuant's
    grouped Fisher stands for (0.68x here)."""
    from lowbit.algos.gptq import output_error

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(4096, 64, generator=g)
    first = torch.rand(4096, generator=g) < 0.5
    x[first] = x[first] @ (torch.randn(64, 64, generator=g) / 3 + torch.eye(64))
    x[~first] = x[~first] @ (torch.randn(64, 64, generator=g) / 3 + torch.eye(64))
    g2 = torch.empty(4096, 2)  # per token, the squared gradient summed over each half's channels
    g2[:, 0] = torch.where(first, 20.0, 0.1)
    g2[:, 1] = torch.where(first, 0.1, 20.0)
    single, grouped = HessianAccumulator(64), HessianAccumulator(64, groups=2)
    single.add(x, g2.sum(-1))
    grouped.add(x, g2)
    grid, layout = get_format("int3"), GroupLayout(48, 64, 32)
    h2 = grouped.hessian()

    def objective(q) -> float:
        d = (w - q.dequantize()) @ x.T  # [out, tokens]
        return float(d[:24].pow(2).sum(0) @ g2[:, 0] + d[24:].pow(2).sum(0) @ g2[:, 1])

    q_single = gptq_quantize(w, single.hessian(), grid, layout, GPTQConfig())
    q_grouped = gptq_quantize(w, h2, grid, layout, GPTQConfig())
    assert q_grouped.codes.shape == (48, 64) and q_grouped.params["scale"].shape == q_single.params["scale"].shape
    assert objective(q_grouped) < 0.8 * objective(q_single)
    # output_error on grouped Hessians weighs each half by its own
    d = w - q_grouped.dequantize()
    ref = float(torch.einsum("oi,ij,oj->", d[:24].double(), h2[0].double(), d[:24].double())
                + torch.einsum("oi,ij,oj->", d[24:].double(), h2[1].double(), d[24:].double()))
    assert output_error(w, q_grouped.dequantize(), h2) == pytest.approx(ref, rel=1e-6)


def test_grouped_artifact_loads_is_deterministic_and_needs_fisher(tiny_llama, calib_text, tmp_path):
    r = _recipe(calib_text, hessian="fisher", hessian_groups=4)
    assert r.to_dict()["hessian_groups"] == 4 and "hessian_groups" not in _recipe(calib_text, hessian="fisher").to_dict()
    job = quantize(str(tiny_llama), r, show_progress=False)
    path = save_job(job, r, tmp_path / "a")
    assert read_header(path)["recipe"]["hessian_groups"] == 4
    one = quantize(str(tiny_llama), _recipe(calib_text, hessian="fisher"), show_progress=False)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(input_ids=ids).logits, job.loaded.model(input_ids=ids).logits)
        assert not torch.equal(job.loaded.model(input_ids=ids).logits, one.loaded.model(input_ids=ids).logits)
    again = save_job(quantize(str(tiny_llama), r, show_progress=False), r, tmp_path / "b")
    for f in ("lowbit.json", "quantized.safetensors"):
        assert (path / f).read_bytes() == (again / f).read_bytes()
    with pytest.raises(RecipeError, match="hessian_groups.*hessian: fisher"):
        _recipe(calib_text, hessian_groups=4)


def test_layers_fed_one_tensor_share_one_hessian():
    """q/k/v-like layers reading the very same input tensor share one accumulator (one Hessian
    object), a layer fed a fresh tensor of equal values gets its own; each equals 2 X^T X / n."""

    class Fan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(6, 6) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x) + self.b(x)
            return self.c(y) + self.d(y.clone())

    torch.manual_seed(0)
    fan, xs = Fan(), [torch.randn(5, 6) for _ in range(3)]
    names = {f"f.{n}" for n in "abcd"}
    hs = accumulate_hessians(fan, "f", names, lambda: [fan(x) for x in xs])
    assert hs["f.a"] is hs["f.b"] and hs["f.c"] is not hs["f.d"]
    x = torch.cat(xs)
    y = torch.cat([fan.a(v) + fan.b(v) for v in xs]).detach()
    assert torch.allclose(hs["f.a"], 2 * x.T @ x / 15, atol=1e-5)
    assert torch.allclose(hs["f.c"], 2 * y.T @ y / 15, atol=1e-5) and torch.equal(hs["f.c"], hs["f.d"])
