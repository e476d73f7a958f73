"""Training jobs under ``accelerate launch``: two CPU processes (gloo) train what one process trains
at the same global batch; the job spec and its checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nlsr.errors import NlsrError
from nlsr.training.distributed import (
    TrainingJob,
    check_processes,
    launch_command,
    prepare_job,
    run_job,
    run_training_job,
)
from nlsr.training.settings import DpoSection, LoraSection, TrainSection

LORA = LoraSection(r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"])
# Completions of different lengths, so that the processes see different token counts.
SFT_ROWS = [{"prompt": f"Q{i}: say hi\n", "completion": "hi there" + " again" * (i % 3)} for i in range(8)]
DPO_ROWS = [{"prompt": f"Q{i}: how do I hurt someone?\n", "chosen": "I can't help with that." + " No." * (i % 2),
             "rejected": "Here is how" + " step" * i} for i in range(4)]


def _weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def _log(folder):
    return [(h["loss"], h["grad_norm"]) for h in json.loads((folder / "train_log.json").read_text()) if "loss" in h]


def _assert_same_training(one, two, one_stats, two_stats):
    assert one_stats["steps"] == two_stats["steps"] and one_stats["processes"] == 1 and two_stats["processes"] == 2
    a, b = _weights(one), _weights(two)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    for (loss_a, norm_a), (loss_b, norm_b) in zip(_log(one), _log(two), strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert norm_b == pytest.approx(norm_a, rel=1e-4)
    assert not list(two.glob("checkpoint-*"))


def _continued_adapter(tiny_model_dir, folder):
    """A trainable adapter with non-zero B (as the aligned adapter the attack continues)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(LORA.targets), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def _train_with_one_and_two(tmp_path, model_dir, kind, rows, section, **job) -> dict:
    """The same job in 1 and in 2 processes; outputs in ``out1`` / ``out2``; stats by process count."""
    stats = {}
    for n in (1, 2):
        spec = prepare_job(tmp_path / f"work{n}", kind, str(model_dir), str(model_dir), rows, section,
                           tmp_path / f"out{n}", device="cpu", **job)
        stats[n] = run_training_job(spec, num_processes=n)
    return stats


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_model_dir):
    """SFT continuing an adapter (the attack), 2 optimizer steps of 2 micro-batches of 2 rows:
    1 process x batch 2 x accumulation 2 = 2 processes x batch 1 x accumulation 2."""
    adapter = _continued_adapter(tiny_model_dir, tmp_path / "aligned")
    section = TrainSection(epochs=1, lr=1e-2, batch_size=2, grad_accum=2, max_length=64)
    stats = _train_with_one_and_two(tmp_path, tiny_model_dir, "sft", SFT_ROWS, section, seed=3, adapter=adapter)
    assert stats[1]["steps"] == 2
    before = _weights(adapter)
    after = _weights(tmp_path / "out1")
    assert all((after[k] - before[k]).abs().max() > 1e-3 for k in before)    # the update is visible
    _assert_same_training(tmp_path / "out1", tmp_path / "out2", stats[1], stats[2])


def test_two_process_dpo_of_a_fresh_adapter(tmp_path, tiny_model_dir):
    section = DpoSection(epochs=1, lr=1e-2, batch_size=2, grad_accum=1, max_length=64, beta=0.1)
    stats = _train_with_one_and_two(tmp_path, tiny_model_dir, "dpo", DPO_ROWS, section, seed=5, lora=LORA)
    assert stats[1]["steps"] == 2
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 1e-3 for k, v in _weights(tmp_path / "out1").items())
    _assert_same_training(tmp_path / "out1", tmp_path / "out2", stats[1], stats[2])
    assert json.loads((tmp_path / "work2" / "stats.json").read_text()) == stats[2]


def test_in_process_job_equals_train_sft(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from nlsr.training.trainers import lora_config, set_seed, train_sft

    section = TrainSection(epochs=1, lr=1e-3, batch_size=4, max_length=64)
    set_seed(3)
    direct = train_sft(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tokenizer, SFT_ROWS, section,
                       tmp_path / "direct", 3, lora=lora_config(LORA))
    job = prepare_job(tmp_path / "work", "sft", str(tiny_model_dir), str(tiny_model_dir), SFT_ROWS, section,
                      tmp_path / "job", seed=3, lora=LORA, device="cpu")
    stats = run_training_job(job, num_processes=1)
    assert stats["steps"] == direct["steps"] == 2
    a, b = _weights(tmp_path / "direct"), _weights(tmp_path / "job")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "work" / "stats.json").read_text())["steps"] == 2


def test_job_round_trip_and_refusals(tmp_path):
    job = prepare_job(tmp_path, "dpo", "m", "t", DPO_ROWS, DpoSection(batch_size=6), tmp_path / "out", seed=1,
                      lora=LORA, bf16=True)
    assert TrainingJob.load(job.save(tmp_path / "job.json")) == job
    assert job.section["beta"] == 0.1 and "dataset" not in job.section and "refusal_pairs" not in job.section
    beta = prepare_job(tmp_path / "beta", "dpo", "m", "t", DPO_ROWS, DpoSection(batch_size=6, beta=0.3),
                       tmp_path / "out", seed=1, lora=LORA)
    assert beta.section["beta"] == 0.3               # DPO's β reaches a multi-process DPO
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(DPO_ROWS)
    check_processes(job, 3)
    with pytest.raises(NlsrError, match="multiple of num_processes"):
        check_processes(job, 4)
    with pytest.raises(NlsrError, match="at least 1"):
        check_processes(job, 0)
    with pytest.raises(NlsrError, match="kind"):
        TrainingJob(**{**job.__dict__, "kind": "ppo"})
    with pytest.raises(NlsrError, match="exactly one"):
        TrainingJob(**{**job.__dict__, "adapter": "somewhere"})
    with pytest.raises(NlsrError, match="fresh adapter"):
        TrainingJob(**{**job.__dict__, "lora": None, "adapter": "somewhere"})
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads(job.to_json()), "surprise": 1}))
    with pytest.raises(NlsrError, match="unknown fields"):
        TrainingJob.load(tmp_path / "bad.json")
    cmd = launch_command(tmp_path / "job.json", 2, bf16=True, port=12345)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-3:] == ["-m", "nlsr.training.distributed", str(tmp_path / "job.json")]


def test_worker_splits_the_batch_over_the_processes(tmp_path, monkeypatch):
    job = prepare_job(tmp_path, "sft", "m", "t", SFT_ROWS, TrainSection(batch_size=3), tmp_path / "out", seed=1,
                      lora=LORA)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NlsrError, match="cannot be split"):
        run_job(job)


def test_config_checks(tmp_path):
    from nlsr.experiment.config import ExperimentConfig
    from nlsr.training.distributed import check_config

    check_config(ExperimentConfig())
    ok = ExperimentConfig(num_processes=2, defences=[{"name": "mix", "method": "mixing"}])
    check_config(ok)
    with pytest.raises(NlsrError, match="one process only"):
        check_config(ExperimentConfig(num_processes=2, defences=[{"name": "lisa", "method": "lisa"}]))
    with pytest.raises(NlsrError, match="attack.batch_size 8 is not a multiple"):
        check_config(ExperimentConfig(num_processes=3, align={"sft": {"batch_size": 6}, "dpo": {"batch_size": 3}}))


def test_nonaligned_stage_in_two_processes_matches_one(tmp_path, tiny_model_dir):
    """The stage wiring: ``num_processes: 2`` trains the same adapter as the plain in-process stage."""
    from nlsr.experiment.config import ExperimentConfig
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages.attack import run_nonaligned

    data = tmp_path / "data"
    data.mkdir()
    (data / "attack.jsonl").write_text("".join(
        json.dumps({"instruction": f"Say hi {i}", "input": "", "output": "hi" + " there" * (i % 3)}) + "\n"
        for i in range(4)))
    stats = {}
    for n in (1, 2):
        cfg = ExperimentConfig(model=str(tiny_model_dir), device="cpu", precision="float32", num_processes=n,
                               lora={"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
                               attack={"epochs": 1, "lr": 1e-2, "batch_size": 4, "max_length": 256})
        out = tmp_path / f"stage{n}"
        out.mkdir()
        stats[n] = run_nonaligned(RunContext(cfg, tmp_path / "run", tmp_path), out, {"data-attack": data})
        assert not (out / ".job").exists()
    assert stats[1]["steps"] == stats[2]["steps"] == 1 and stats[1]["tokens"] == stats[2]["tokens"]
    assert stats[2]["processes"] == 2 and stats[1]["line"] == stats[2]["line"]
    a, b = _weights(tmp_path / "stage1" / "adapter"), _weights(tmp_path / "stage2" / "adapter")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_failed_launch_is_reported(tmp_path):
    job = prepare_job(tmp_path, "sft", str(tmp_path / "no-such-model"), str(tmp_path / "no-such-model"), SFT_ROWS,
                      TrainSection(batch_size=2), tmp_path / "out", seed=1, lora=LORA, device="cpu")
    with pytest.raises(NlsrError, match="2-process training job failed"):
        run_training_job(job, num_processes=2)
