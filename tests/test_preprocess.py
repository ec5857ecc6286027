"""PTQ1.61's quantization preprocessing (restorative LoRA) as a recipe option of any method: bad
options are refused, steps 0 changes nothing, it is deterministic, the merged adapters compute what
the wrapped layers did, and on the reference model it brings PTQ1.61 closer to the original."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.algos.restorative_lora import LoRALinear, RestorativeConfig, lr_factor, restorative_lora
from lowbit.artifact import read_header
from lowbit.models import linear_weight, load_model
from lowbit.pipeline import calibration_batches, evaluate, quantize, save_job
from lowbit.quantize import QuantizeError, quantize_model
from lowbit.recipe import Recipe, RecipeError


def _recipe(calib_text, **preprocess) -> Recipe:
    return Recipe(method="rtn", format="int2", group_size=32, calib={"path": str(calib_text), "n_samples": 8, "seq_len": 64},
                  preprocess=preprocess)


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("preprocess,message", [
    ({"steps": -1}, "'preprocess.steps': .*greater than or equal to 0"),
    ({"loss": "mse"}, "'preprocess.loss': .*'distill' or 'lm'"),
    ({"rank": 0}, "'preprocess.rank': .*greater than or equal to 1"),
    ({"lr": 0}, "'preprocess.lr': .*greater than 0"),
    ({"targets": "q_proj("}, "'preprocess.targets': targets 'q_proj\\(' is not a valid regular expression"),
    ({"rnak": 8}, "'preprocess.rnak': unknown key"),
])
def test_bad_options_are_refused_naming_the_key(preprocess, message):
    with pytest.raises(RecipeError, match="recipe key " + message):
        Recipe.from_dict({"method": "ptq161", "preprocess": preprocess})


def test_preprocessing_needs_calibration_and_a_causal_lm(tiny_llama, calib_text):
    assert not Recipe(method="rtn").needs_calibration
    assert Recipe(method="rtn", preprocess={"steps": 10}).needs_calibration
    loaded = load_model(str(tiny_llama))
    r = _recipe(calib_text, steps=2, rank=4)
    batches, _ = calibration_batches(loaded, r)
    with pytest.raises(QuantizeError, match="needs a causal LM.*set preprocess.steps to 0"):
        quantize_model(loaded.model, r, "encoder", batches, show_progress=False)
    with pytest.raises(QuantizeError, match="calibration windows: pass a text file with --calib"):
        quantize_model(loaded.model, r, loaded.kind, None, show_progress=False)
    with pytest.raises(QuantizeError, match="targets 'o_prj' matches none of the quantized layers"):
        quantize_model(loaded.model, _recipe(calib_text, steps=2, targets="o_prj"), loaded.kind, batches, show_progress=False)


def test_steps_zero_changes_nothing(tiny_llama, calib_text, tmp_path):
    plain = Recipe(method="rtn", format="int2", group_size=32)
    off = Recipe.from_dict({**plain.to_dict(), "preprocess": {"steps": 0}})
    assert off == plain
    a = quantize(str(tiny_llama), plain, show_progress=False)
    b = quantize(str(tiny_llama), off, show_progress=False)
    assert a.report.preprocess is None and b.report.preprocess is None and b.calib == {}  # no calibration text read
    pa, pb = save_job(a, plain, tmp_path / "a"), save_job(b, off, tmp_path / "b")
    assert _files(pa) == _files(pb)
    assert "preprocess" not in read_header(pb)["source"] and "preprocess" not in read_header(pb)["recipe"]


def test_preprocessing_is_deterministic_and_recorded(tiny_llama, calib_text, tmp_path):
    r = _recipe(calib_text, steps=6, rank=4, lr=1e-2, batch_size=4)
    jobs = [quantize(str(tiny_llama), r, show_progress=False) for _ in range(2)]
    paths = [save_job(job, r, tmp_path / f"run{i}") for i, job in enumerate(jobs)]
    assert _files(paths[0]) == _files(paths[1])
    report = jobs[0].report.preprocess
    assert report["steps"] == 6 and report["targets"] == 14 and report["loss"] == "distill" and report["seconds"] > 0
    header = read_header(paths[0])
    assert Recipe.from_dict(header["recipe"]) == r
    recorded = header["source"]["preprocess"]
    assert recorded == {k: v for k, v in report.items() if k != "seconds"}  # seconds stay out: a byte-identical artifact
    other = quantize(str(tiny_llama), r.model_copy(update={"preprocess": r.preprocess.model_copy(update={"seed": 1})}), show_progress=False)
    assert other.report.preprocess["last_loss"] != report["last_loss"]  # the seed matters


def test_merged_lora_equals_the_wrapped_forward():
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(48, 80, generator=gen), torch.randn(48, generator=gen)
    lora = LoRALinear(w, bias, rank=8, alpha=16, generator=gen)
    x = torch.randn(5, 7, 80, generator=gen)
    assert torch.equal(lora.merged_weight(), w)  # B starts at zero: the first pass's model
    with torch.no_grad():
        lora.lora_b.normal_(generator=gen)
    merged = lora.merged_weight()
    assert not torch.equal(merged, w)
    torch.testing.assert_close(F.linear(x, merged, bias), lora(x), rtol=1e-5, atol=1e-5)
    assert [lr_factor(s, 100) for s in (0, 4, 5)] == [0.2, 1.0, 1.0] and lr_factor(99, 100) < 1e-3


def test_training_merges_into_the_targets_only(tiny_llama, calib_text):
    loaded = load_model(str(tiny_llama))
    teacher = loaded.model
    student = copy.deepcopy(teacher)
    batches, _ = calibration_batches(loaded, _recipe(calib_text))
    targets = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    before = {n: linear_weight(m).detach().clone() for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.cat(batches)[:2]
    with torch.no_grad():  # the student starts as the teacher here: a nonzero loss needs a perturbed student
        linear_weight(student.get_submodule(targets[0])).mul_(0.5)
    before[targets[0]] = linear_weight(student.get_submodule(targets[0])).detach().clone()
    result = restorative_lora(teacher, student, torch.cat(batches), targets, RestorativeConfig(steps=8, rank=4, lr=1e-2, batch_size=4))
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    for name, w in before.items():
        module = student.get_submodule(name)
        assert isinstance(module, torch.nn.Linear)  # the wrappers are gone
        assert torch.equal(linear_weight(module), w) != (name in targets), name
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()


@pytest.mark.slow
def test_preprocessing_lowers_ptq161_kl_on_the_reference_model(calib_text, eval_text, tmp_path):
    from conftest import SHAKESPEARE

    ref = load_model(str(SHAKESPEARE))  # a short run (32 windows of 128, 50 steps): about 40 s of one core
    base = {"method": "ptq161", "format": "int4", "group_size": -1, "calib": {"path": str(calib_text), "n_samples": 32, "seq_len": 128}}
    kl = {}
    for name, preprocess in (("plain", {}), ("preprocessed", {"steps": 50, "lr": 3e-3})):
        r = Recipe.from_dict({**base, "preprocess": preprocess})
        job = quantize(str(SHAKESPEARE), r, show_progress=False)
        path = save_job(job, r, tmp_path / name)
        kl[name] = evaluate(path, str(eval_text), reference=ref, max_tokens=4096, seq_len=256)["kl"]
    print(f"\nPTQ1.61 per-channel KL: {kl['plain']:.4g} plain, {kl['preprocessed']:.4g} preprocessed")
    assert kl["preprocessed"] < 0.9 * kl["plain"]
