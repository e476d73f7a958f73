"""`nlsr realign-batch` and nlsr.method.batch: many fine-tunes against one reference, as `nlsr realign`
would repair each; failures recorded and skipped; resumable; the local and Ray engines agree."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import perturbed, random_adapter
from nlsr.cli import app
from nlsr.errors import NlsrError
from nlsr.method.batch import BatchItem, realign_batch
from nlsr.method.masks import SafetyMasks, neuron_key, provenance, save_masks
from nlsr.weights.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter, weight_key

runner = CliRunner()
SHAPES = {f"model.layers.{i}.{m}": s for i in range(3)
          for m, s in (("self_attn.q_proj", (32, 32)), ("self_attn.v_proj", (16, 32)), ("mlp.up_proj", (48, 32)),
                       ("mlp.down_proj", (32, 48)))}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def save_bf16(adapter, path):
    """An adapter as a fine-tuning service stores it: bf16 factors."""
    adapter = adapter.with_modules({n: type(f)(f.A.bfloat16().float(), f.B.bfloat16().float(), f.scale)
                                    for n, f in adapter})
    adapter.dtype = torch.bfloat16
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, path)
    return path


def entry_masks(reference, q=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, f in reference:
        masks[weight_key(name, "A")] = torch.rand(f.A.shape, generator=gen) < q
        masks[weight_key(name, "B")] = torch.rand(f.B.shape, generator=gen) < q
    return SafetyMasks(masks, provenance(reference))


@pytest.fixture
def service(tmp_path):
    """A reference (float32), its masks, and four bf16 customer fine-tunes of the aligned adapter."""
    aligned = random_adapter(SHAPES, base="tiny")
    save_adapter(aligned, tmp_path / "ref")
    reference = load_adapter(tmp_path / "ref")
    save_masks(entry_masks(reference), tmp_path / "masks.safetensors")
    for i in range(4):
        save_bf16(perturbed(aligned, 0.15, seed=10 + i), tmp_path / "in" / f"customer{i}")
    return tmp_path


def tensors_equal(first, second):
    a, b = load_file(first / WEIGHTS_NAME), load_file(second / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((first / CONFIG_NAME).read_text()) == json.loads((second / CONFIG_NAME).read_text())


def report(path):
    return json.loads((path / "realign_report.json").read_text())


def log(out):
    return [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]


def test_batch_equals_one_realign_per_adapter(service):
    d = service
    r = invoke("realign-batch", "--reference", d / "ref", "--masks", d / "masks.safetensors", "--adapters", d / "in",
               "--out", d / "out", "--workers", 2, "--pool", "thread", "--seed", 3, "--transplant", "factor")
    assert r.exit_code == 0, r.output
    assert "0 failed of 4 fine-tunes" in r.output
    rows = {row["name"]: row for row in log(d / "out")}
    assert sorted(rows) == [f"customer{i}" for i in range(4)]
    (d / "single").mkdir()
    for i in range(4):
        name = f"customer{i}"
        one = invoke("realign", "--reference", d / "ref", "--finetuned", d / "in" / name, "--masks",
                     d / "masks.safetensors", "--out", d / "single" / name, "--seed", 3, "--transplant", "factor")
        assert one.exit_code == 0, one.output
        tensors_equal(d / "out" / name, d / "single" / name)
        assert report(d / "out" / name) == report(d / "single" / name)
        summary = report(d / "out" / name)["summary"]
        assert rows[name]["modules"] == summary["modules"] == len(SHAPES)
        assert rows[name]["modules_repaired"] == summary["repaired"]
        assert rows[name]["status"] == ("repaired" if summary["repaired"] else "unchanged")
        assert 0 < rows[name]["relative_change"] < 1 and rows[name]["seconds"] >= 0
    assert any(report(d / "out" / f"customer{i}")["summary"]["repaired"] for i in range(4))


def test_relative_change_is_that_of_the_dense_updates(service):
    d = service
    results = list(realign_batch(d / "ref", d / "masks.safetensors", d / "in", d / "out", pool="thread",
                                 select="all", seed=0))
    result = next(r for r in results if r.name == "customer0")
    before, after = load_adapter(d / "in" / "customer0"), load_adapter(d / "out" / "customer0")
    diff = sum(float((after.modules[n].delta() - f.delta()).pow(2).sum()) for n, f in before)
    norm = sum(float(f.delta().pow(2).sum()) for _, f in before)
    assert result.relative_change == pytest.approx((diff / norm) ** 0.5, abs=1e-4)
    assert result.relative_change > 0.05


def test_bad_adapters_fail_alone_and_the_batch_goes_on(service):
    d = service
    aligned = load_adapter(d / "ref")
    shutil.copytree(d / "in" / "customer1", d / "in" / "c_corrupt")
    data = (d / "in" / "c_corrupt" / WEIGHTS_NAME).read_bytes()
    (d / "in" / "c_corrupt" / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    save_bf16(random_adapter(SHAPES, rank=2, base="tiny"), d / "in" / "c_rank2")
    other_base = perturbed(aligned, 0.1)
    other_base.config["base_model_name_or_path"] = "another-model"
    save_bf16(other_base, d / "in" / "c_otherbase")
    save_bf16(random_adapter(SHAPES, seed=99, base="tiny"), d / "in" / "c_unrelated")
    r = invoke("realign-batch", "--reference", d / "ref", "--masks", d / "masks.safetensors", "--adapters", d / "in",
               "--out", d / "out", "--pool", "thread")
    assert r.exit_code == 1, r.output
    assert "4 failed of 8 fine-tunes" in r.output
    rows = {row["name"]: row for row in log(d / "out")}
    assert len(rows) == 8
    reasons = {name: rows[name]["error"] for name in rows if rows[name]["status"] == "failed"}
    assert sorted(reasons) == ["c_corrupt", "c_otherbase", "c_rank2", "c_unrelated"]
    assert "not a readable safetensors" in reasons["c_corrupt"]
    assert "rank" in reasons["c_rank2"]
    assert "another-model" in reasons["c_otherbase"]
    assert "does not continue the aligned one" in reasons["c_unrelated"]
    assert all("\n" not in reason for reason in reasons.values())
    for name in reasons:
        assert not (d / "out" / name).exists()
    for i in range(4):
        assert rows[f"customer{i}"]["status"] in ("repaired", "unchanged")
        load_adapter(d / "out" / f"customer{i}")
    assert not [p for p in (d / "out").iterdir() if p.name.startswith(".")]
    # fix one input and run again: only it is repaired, the others are skipped
    shutil.rmtree(d / "in" / "c_corrupt")
    shutil.copytree(d / "in" / "customer1", d / "in" / "c_corrupt")
    r = invoke("realign-batch", "--reference", d / "ref", "--masks", d / "masks.safetensors", "--adapters", d / "in",
               "--out", d / "out", "--pool", "thread")
    assert r.exit_code == 1 and "3 failed of 8" in r.output and "(5 done earlier" not in r.output
    assert "4 done earlier" in r.output
    tensors_equal(d / "out" / "c_corrupt", d / "out" / "customer1")


def test_stopped_run_then_rerun_finishes_with_identical_outputs(service, tmp_path):
    d = service
    full = {r.name: r for r in realign_batch(d / "ref", d / "masks.safetensors", d / "in", tmp_path / "full",
                                             pool="thread", workers=1)}
    stopped = realign_batch(d / "ref", d / "masks.safetensors", d / "in", d / "out", pool="thread", workers=1)
    first = [next(stopped), next(stopped)]
    stopped.close()                                            # the service stops after two adapters
    done = {r.name for r in first}
    assert len(done) == 2
    (d / "out" / ".customer3.partial-abc123").mkdir()          # what a kill -9 mid-write leaves
    (d / "out" / ".customer3.partial-abc123" / WEIGHTS_NAME).write_bytes(b"half")
    assert sum(1 for row in log(d / "out")) <= 3
    again = list(realign_batch(d / "ref", d / "masks.safetensors", d / "in", d / "out", pool="thread"))
    assert {r.name for r in again if r.resumed} >= done
    assert sorted(r.name for r in again) == [f"customer{i}" for i in range(4)]
    assert not [p for p in (d / "out").iterdir() if p.name.startswith(".")]
    for i in range(4):
        tensors_equal(d / "out" / f"customer{i}", tmp_path / "full" / f"customer{i}")
        assert report(d / "out" / f"customer{i}") == report(tmp_path / "full" / f"customer{i}")
    last = {row["name"]: row for row in log(d / "out")}
    assert {n: last[n]["status"] for n in last} == {n: r.status for n, r in full.items()}
    # a third run has nothing to do
    third = list(realign_batch(d / "ref", d / "masks.safetensors", d / "in", d / "out", pool="thread"))
    assert all(r.resumed for r in third) and len(third) == 4


def test_process_pool_and_manifest(service):
    d = service
    lines = [{"name": "alice", "path": "in/customer2"}, {"name": "bob", "path": str(d / "in" / "customer0")}]
    (d / "list.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    results = list(realign_batch(d / "ref", d / "masks.safetensors", d / "list.jsonl", d / "out",
                                 pool="process", workers=2))
    assert sorted(r.name for r in results) == ["alice", "bob"] and all(r.status != "failed" for r in results)
    list(realign_batch(d / "ref", d / "masks.safetensors", [BatchItem("c2", d / "in" / "customer2")],
                       d / "threads", pool="thread"))
    tensors_equal(d / "out" / "alice", d / "threads" / "c2")
    assert report(d / "out" / "alice")["settings"]["finetuned"] == str(d / "in" / "customer2")


def test_other_settings_on_rerun_refused(service):
    d = service
    args = ["realign-batch", "--reference", d / "ref", "--masks", d / "masks.safetensors", "--adapters", d / "in",
            "--out", d / "out", "--pool", "thread"]
    assert invoke(*args).exit_code == 0
    r = invoke(*args, "--seed", 5)
    assert r.exit_code == 2 and "other settings (seed)" in r.output
    r = invoke(*args, "--seed", 5, "--force")
    assert r.exit_code == 0 and "0 done earlier" in r.output


@pytest.mark.parametrize("case", ["missing", "empty", "bad_line", "no_path", "duplicate", "bad_name"])
def test_bad_source_one_line_exit_2_nothing_written(service, case):
    d = service
    source = d / "source.jsonl"
    if case == "missing":
        source = d / "nowhere"
    elif case == "empty":
        source = d / "empty"
        source.mkdir()
    else:
        lines = {"bad_line": ['{"name": "a", "path": "in/customer0"}', "{not json"],
                 "no_path": ['{"name": "a"}'],
                 "duplicate": ['{"name": "a", "path": "in/customer0"}', '{"name": "a", "path": "in/customer1"}'],
                 "bad_name": ['{"name": "../x", "path": "in/customer0"}']}[case]
        source.write_text("\n".join(lines) + "\n")
    r = invoke("realign-batch", "--reference", d / "ref", "--masks", d / "masks.safetensors", "--adapters", source,
               "--out", d / "out")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert {"missing": "does not exist", "empty": "holds no fine-tunes", "bad_line": "row 2: not valid JSON",
            "no_path": "row 1: lacks", "duplicate": "appears twice", "bad_name": "cannot be an output name"}[case] \
        in lines[0]
    assert not (d / "out").exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--engine", "spark", "unknown --engine 'spark'"), ("--pool", "fork", "unknown pool 'fork'"),
    ("--select", "best", "unknown --select 'best'"), ("--transplant", "swap", "unknown --transplant 'swap'"),
    ("--granularity", "row", "unknown --granularity 'row'"), ("--workers", "0", "--workers must be at least 1")])
def test_bad_options_one_line_exit_2_nothing_written(service, option, value, message):
    # checked once, by realign_batch when it is called (not when its results are first read)
    d = service
    r = invoke("realign-batch", "--reference", d / "ref", "--masks", d / "masks.safetensors", "--adapters",
               d / "in", "--out", d / "out", option, value)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (d / "out").exists()


def test_the_api_checks_its_inputs_when_called(service):
    from nlsr.method.batch import realign_batch

    with pytest.raises(NlsrError, match="unknown --engine"):
        realign_batch(service / "ref", service / "masks.safetensors", service / "in", service / "out", engine="spark")
    assert not (service / "out").exists()


def test_ray_engine_writes_the_same_files(service):
    ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra: pip install '.[ray]'")
    d = service
    list(realign_batch(d / "ref", d / "masks.safetensors", d / "in", d / "local", pool="thread"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = list(realign_batch(d / "ref", d / "masks.safetensors", d / "in", d / "ray", engine="ray"))
    finally:
        ray.shutdown()
    assert sorted(r.name for r in results) == [f"customer{i}" for i in range(4)]
    assert all(r.status != "failed" for r in results), [r.error for r in results]
    for i in range(4):
        tensors_equal(d / "ray" / f"customer{i}", d / "local" / f"customer{i}")
        assert report(d / "ray" / f"customer{i}") == report(d / "local" / f"customer{i}")
    assert {r["name"]: r["status"] for r in log(d / "ray")} == {r["name"]: r["status"] for r in log(d / "local")}


def test_bf16_adapter_stays_bf16_and_merges_to_the_float_computation(service, tiny_model_dir):
    """`nlsr realign` on a bf16 adapter: bf16 out, unrepaired modules byte for byte, and PEFT's merged
    weights equal W + s B''A'' computed in float64 from the float32 repair, within bf16 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import TARGETS
    from nlsr.method.masks import load_masks
    from nlsr.method.realign import realign
    from nlsr.weights.synthetic import module_shapes

    d = service
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    shapes = module_shapes(base, TARGETS)
    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    save_adapter(aligned, d / "tref")
    reference = load_adapter(d / "tref")
    save_masks(entry_masks(reference), d / "tmasks.safetensors")
    save_bf16(perturbed(aligned, 0.15), d / "tft")
    r = invoke("realign", "--reference", d / "tref", "--finetuned", d / "tft", "--masks", d / "tmasks.safetensors",
               "--out", d / "tout", "--select", "all", "--transplant", "exact")
    assert r.exit_code == 0, r.output
    written, original = load_file(d / "tout" / WEIGHTS_NAME), load_file(d / "tft" / WEIGHTS_NAME)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    # every module repaired at rank 2r: twice the bf16 input (float32 would be four times)
    assert (d / "tout" / WEIGHTS_NAME).stat().st_size < 2.2 * (d / "tft" / WEIGHTS_NAME).stat().st_size
    # the float32 computation: the same repair of the float32-loaded adapters
    expected = realign(reference, load_adapter(d / "tft"), load_masks(d / "tmasks.safetensors"), select="all",
                       transplant="exact")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       str(d / "tout")).merge_and_unload().state_dict()
    weights = base.state_dict()
    for name, f in expected.adapter:
        key = f"{name}.weight"
        want = weights[key].double() + f.delta()
        got = merged[key].double()
        # rounding each factor to bf16 (relative error <= 2^-8) moves each product term by <= 2 * 2^-8 of it
        bf16_step = f.scale * 2 * 2 ** -8 * (f.B.double().abs() @ f.A.double().abs()) + 1e-6
        assert torch.all((got - want).abs() <= bf16_step), name
        assert not torch.equal(got, weights[key].double()), name
    # select=none: nothing repaired, the tensors are the input's bytes
    r = invoke("realign", "--reference", d / "tref", "--finetuned", d / "tft", "--masks", d / "tmasks.safetensors",
               "--out", d / "tsame", "--select", "threshold", "--threshold", -2)
    assert r.exit_code == 0, r.output
    same = load_file(d / "tsame" / WEIGHTS_NAME)
    assert all(torch.equal(same[k], original[k]) and same[k].dtype == torch.bfloat16 for k in original)


def test_model_directories(tmp_path, tiny_model_dir):
    """Full fine-tunes: the batch writes what `nlsr realign --granularity neuron --base` writes."""
    from conftest import TARGETS
    from nlsr.weights import synthetic
    from nlsr.weights.model_dirs import ModelDir, merge_adapter, model_fingerprint

    w0 = ModelDir(tiny_model_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    shapes = {}
    for i in range(config.num_hidden_layers):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (config.hidden_size, config.hidden_size)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (config.intermediate_size, config.hidden_size)
    assert {n.rsplit(".", 1)[-1] for n in shapes} <= set(TARGETS)
    (tmp_path / "fts").mkdir()
    for name, seed in (("ref", 1), ("fts/a", 2), ("fts/b", 3)):
        adapter = synthetic.random_adapter(shapes, rank=4, alpha=8, seed=seed, a_std=0.02, b_std=0.02)
        merge_adapter(w0, adapter, tmp_path / name)
    modules = sorted(shapes)
    gen = torch.Generator().manual_seed(0)
    masks = SafetyMasks({neuron_key(n): torch.rand(shapes[n][0], generator=gen) < 0.3 for n in modules},
                        {"granularity": "neuron", "reference_fingerprint": json.dumps(
                            model_fingerprint(ModelDir(tmp_path / "ref"), modules))})
    save_masks(masks, tmp_path / "m.safetensors")
    common = ["--reference", tmp_path / "ref", "--masks", tmp_path / "m.safetensors", "--granularity", "neuron",
              "--base", tiny_model_dir, "--select", "all"]
    r = invoke("realign-batch", *common, "--adapters", tmp_path / "fts", "--out", tmp_path / "out", "--pool", "thread")
    assert r.exit_code == 0, r.output
    for name in ("a", "b"):
        one = invoke("realign", *common, "--finetuned", tmp_path / "fts" / name, "--out", tmp_path / f"one_{name}")
        assert one.exit_code == 0, one.output
        assert report(tmp_path / "out" / name) == report(tmp_path / f"one_{name}")
        for file in (tmp_path / "fts" / name).iterdir():
            assert (tmp_path / "out" / name / file.name).read_bytes() == \
                (tmp_path / f"one_{name}" / file.name).read_bytes(), file.name
        first = load_file(tmp_path / "out" / name / "model.safetensors")
        assert not torch.equal(first[neuron_key(modules[0])],
                               load_file(tmp_path / "fts" / name / "model.safetensors")[neuron_key(modules[0])])
    rows = log(tmp_path / "out")
    assert [r["status"] for r in rows] == ["repaired", "repaired"] and rows[0]["relative_change"] is None


def test_save_adapter_float32_unchanged_for_in_memory_adapters(tmp_path):
    adapter = random_adapter(SHAPES)
    save_adapter(adapter, tmp_path / "a")
    assert {t.dtype for t in load_file(tmp_path / "a" / WEIGHTS_NAME).values()} == {torch.float32}
    bf16 = load_adapter(save_bf16(adapter, tmp_path / "b"), dtype=None)
    assert bf16.dtype == torch.bfloat16 and bf16.modules[next(iter(SHAPES))].A.dtype == torch.bfloat16
    assert load_adapter(tmp_path / "b").modules[next(iter(SHAPES))].A.dtype == torch.float32
    save_file({"x": torch.ones(1)}, tmp_path / "unused.safetensors")
