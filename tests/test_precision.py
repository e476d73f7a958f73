"""The precision policy: auto follows the hardware, explicit choices win, the choice is recorded."""

import pytest

from nlsr import precision as P
from nlsr.errors import NlsrError


def _cpu(flags: tuple[str, ...]) -> P.CpuInfo:
    return P.CpuInfo(model="test cpu", cores=2, flags=flags, torch_capability="AVX2")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend to run on a CPU with the given flags (and no GPU)."""
    import torch

    monkeypatch.delenv("NLSR_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def use(flags: tuple[str, ...]) -> None:
        monkeypatch.setattr(P, "cpu_info", lambda: _cpu(flags))
    return use


def test_auto_is_float32_on_a_cpu_without_native_bf16(cpu_flags):
    cpu_flags(("avx2",))
    chosen = P.resolve_precision("auto")
    assert chosen.dtype == "float32" and not chosen.bf16 and chosen.device == "cpu"
    assert "no native bf16" in chosen.reason


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16(cpu_flags, flag):
    cpu_flags(("avx2", "avx512f", flag))
    chosen = P.resolve_precision(None)
    assert chosen.dtype == "bfloat16" and flag in chosen.reason


def test_explicit_choices_and_aliases_win(cpu_flags):
    cpu_flags(("avx512_bf16",))
    assert P.resolve_precision("float32").dtype == "float32"
    assert P.resolve_precision("fp32").dtype == "float32"
    cpu_flags(("avx2",))
    slow = P.resolve_precision("bf16")
    assert slow.dtype == "bfloat16" and "slower" in slow.reason


def test_environment_overrides_auto_only(cpu_flags, monkeypatch):
    cpu_flags(("avx512_bf16",))
    monkeypatch.setenv("NLSR_PRECISION", "float32")
    assert P.resolve_precision("auto").dtype == "float32"
    assert "NLSR_PRECISION" in P.resolve_precision("auto").reason
    assert P.resolve_precision("bfloat16").dtype == "bfloat16"


def test_unknown_precision_is_refused(cpu_flags):
    cpu_flags(())
    with pytest.raises(NlsrError, match="unknown precision 'half'"):
        P.resolve_precision("half")


def test_record_names_the_cpu_and_choice(cpu_flags):
    cpu_flags(("avx2",))
    record = P.resolve_precision().record()
    assert record["dtype"] == "float32" and record["cpu"]["model"] == "test cpu"
    assert record["cpu"]["native_bf16"] is False
    assert "float32" in P.resolve_precision().line()


def test_cpu_info_reads_this_machine():
    info = P.cpu_info()
    assert info.cores >= 1 and info.torch_capability


def test_training_arguments_follow_the_precision(tmp_path):
    from nlsr.training.settings import TrainSection
    from nlsr.training.trainers import _common_args

    section = TrainSection(batch_size=4, epochs=1)
    assert _common_args(section, tmp_path, 0, True, bf16=False, rows=40)["bf16"] is False
    assert _common_args(section, tmp_path, 0, True, bf16=True, rows=40)["bf16"] is True


def test_short_stages_checkpoint_often(tmp_path):
    from nlsr.training.settings import TrainSection
    from nlsr.training.trainers import _save_steps

    assert _save_steps(TrainSection(batch_size=8, epochs=1), rows=48) == 2       # 6 steps
    assert _save_steps(TrainSection(batch_size=8, epochs=3), rows=8000) == 25    # 3000 steps


def test_stage_keys_and_manifests_carry_the_precision(cpu_flags, tmp_path):
    from nlsr.experiment.config import ExperimentConfig
    from nlsr.experiment.pipeline import RunContext, Stage, run_stages
    from nlsr.experiment.plan import build_stages

    cpu_flags(("avx2",))
    stages = {s.name: s for s in build_stages(ExperimentConfig())}
    assert stages["align_sft"].params["precision"] == "float32"
    assert stages["evaluate-attacked"].params["precision"] == "float32"
    assert "precision" not in stages["data"].params          # data does not depend on it
    bf16 = {s.name: s for s in build_stages(ExperimentConfig(precision="bfloat16"))}
    assert bf16["align_sft"].params["precision"] == "bfloat16"

    ctx = RunContext(ExperimentConfig(), tmp_path / "run", tmp_path)
    manifests = run_stages(ctx, [Stage("s", lambda c, o, i: {"tokens": 100, "line": "ok"}, {})], log=lambda m: None)
    manifest = manifests["s"]
    assert manifest["machine"]["dtype"] == "float32" and manifest["machine"]["cpu"]["model"] == "test cpu"
    assert manifest["tokens"] == 100 and manifest["peak_memory_mib"] > 0
