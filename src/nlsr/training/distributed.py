"""Training jobs that can be fanned out to several processes (data parallel) with ``accelerate launch``.

The experiment pipeline stays one process. A training stage describes its job in a
:class:`TrainingJob` (JSON: what to train, on which rows, with which settings, where to save) and
hands it to :func:`run_training_job`:

* with one process the job runs here, in-process;
* with ``N > 1`` it runs as ``accelerate launch --multi_gpu --num_processes N -m nlsr.training.distributed
  JOB.json``: every process rebuilds the model on its own device and calls the same
  :func:`nlsr.training.trainers.train_sft` / :func:`~nlsr.training.trainers.train_dpo`; the trainer inside wraps the
  model in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), and only the main process writes
  the adapter, the training log and the stats.

``batch_size`` in a job (and in the config) is the batch of one optimizer micro-step summed over
all processes: each of ``N`` processes takes ``batch_size / N`` rows, so one optimizer step sees
``batch_size x grad_accum`` rows however many processes share it, and the same config gives the
same training (up to floating-point summation order) on one device or eight. ``batch_size`` must
therefore be divisible by ``N``.

Each process holds a whole copy of the model (data parallelism): this makes training faster, not
able to fit a larger model. Identification of a model larger than one device goes through
accelerate's big-model loading instead (``nlsr identify --device-map auto``; see
:func:`nlsr.weights.models.load_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.training.defences import DEFENCES
from nlsr.training.settings import DPO_FIELDS, DpoSection, LoraSection, TrainSection

KINDS = ("sft", "dpo")


@dataclass(frozen=True)
class TrainingJob:
    """One LoRA training run, serialisable to JSON so that a launcher can start it elsewhere.

    Attributes:
        kind: ``sft`` (prompt/completion rows) or ``dpo`` (prompt/chosen/rejected rows).
        model: the base model, as :func:`nlsr.weights.models.load_model` takes it (a directory, hub id, ``smollm2``).
        tokenizer: the tokenizer, as :func:`nlsr.weights.models.load_tokenizer` takes it.
        rows: JSONL file of the rendered training rows.
        section: the :class:`nlsr.training.settings.TrainSection` fields (``beta`` too for DPO); ``batch_size``
            is the batch summed over all processes.
        out_dir: where the adapter, ``train_log.json`` and the checkpoints go.
        seed: the training seed.
        lora: :class:`nlsr.training.settings.LoraSection` fields of a fresh adapter, or None to continue ``adapter``.
        adapter: an adapter directory to continue training (trainable), or None.
        bf16: compute in bfloat16 autocast.
        device: ``cpu`` to train on the CPU; None (or ``cuda``) for each process's own GPU where
            there are GPUs, else the CPU.
        load_precision: precision of the loaded weights (float32: float32 master weights).
        stats: where the main process writes the stats JSON (None: not written).
    """

    kind: str
    model: str
    tokenizer: str
    rows: str
    section: dict
    out_dir: str
    seed: int
    lora: dict | None = None
    adapter: str | None = None
    bf16: bool = False
    device: str | None = None
    load_precision: str = "float32"
    stats: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NlsrError(f"training job kind '{self.kind}' is unknown; use one of {', '.join(KINDS)}")
        if (self.lora is None) == (self.adapter is None):
            raise NlsrError("a training job needs exactly one of 'lora' (a fresh adapter) or 'adapter' "
                            "(a directory to continue)")
        if self.kind == "dpo" and self.lora is None:
            raise NlsrError("a DPO job trains a fresh adapter: give 'lora', not 'adapter'")
        missing = sorted({"batch_size", "grad_accum"} - set(self.section))
        if missing:
            raise NlsrError(f"training job section lacks {missing}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingJob:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise NlsrError(f"cannot read training job '{path}': {err}") from err
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NlsrError(f"training job '{path}' has unknown fields {unknown}")
        return cls(**data)


def _section_fields(section, kind: str) -> dict:
    """The fields of a config section that training reads (TrainSection's, plus DPO's beta)."""
    data = section.model_dump() if hasattr(section, "model_dump") else dict(section)
    keep = set(TrainSection.model_fields) | (set(DPO_FIELDS) if kind == "dpo" else set())
    return {k: v for k, v in data.items() if k in keep}


def prepare_job(work_dir: str | os.PathLike, kind: str, model: str, tokenizer: str, rows: Iterable[dict],
                section, out_dir: str | os.PathLike, seed: int, lora=None, adapter: str | os.PathLike | None = None,
                bf16: bool = False, device: str | None = None) -> TrainingJob:
    """Write ``rows`` to ``work_dir/rows.jsonl`` and return the job (its stats go to ``work_dir/stats.json``).

    ``section`` is a config section (e.g. ``cfg.align.sft``, ``cfg.attack``) or a dict of its fields;
    ``lora`` a :class:`~nlsr.training.settings.LoraSection` (or dict) for a fresh adapter."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"
    with rows_path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if lora is not None and hasattr(lora, "model_dump"):
        lora = lora.model_dump()
    return TrainingJob(kind=kind, model=str(model), tokenizer=str(tokenizer), rows=str(rows_path.resolve()),
                       section=_section_fields(section, kind), out_dir=str(Path(out_dir).resolve()), seed=seed,
                       lora=lora, adapter=None if adapter is None else str(Path(adapter).resolve()),
                       bf16=bf16, device=device, stats=str((work / "stats.json").resolve()))


def check_processes(job: TrainingJob, num_processes: int) -> None:
    """Refuse a process count the job cannot be split over, before anything is launched."""
    if num_processes < 1:
        raise NlsrError(f"num_processes must be at least 1 (got {num_processes})")
    batch = int(job.section["batch_size"])
    if batch % num_processes:
        raise NlsrError(f"batch_size {batch} cannot be split over {num_processes} processes; make "
                        f"batch_size a multiple of num_processes (it is the batch summed over all processes)")
    if num_processes > 1 and _uses_gpus(job.device):
        import torch

        count = torch.cuda.device_count()
        if num_processes > count:
            raise NlsrError(f"num_processes {num_processes} is more than the {count} GPUs visible here; "
                            "use at most one process per GPU (or device: cpu)")


def check_config(cfg) -> None:
    """Refuse settings that cannot run with ``cfg.num_processes`` processes (call at config load or
    before the first stage): batch sizes not divisible by it, defences that train in one process only."""
    n = getattr(cfg, "num_processes", 1)
    if n <= 1:
        return
    problems = [f"{where}.batch_size {section.batch_size} is not a multiple of num_processes {n}"
                for where, section in (("align.sft", cfg.align.sft), ("align.dpo", cfg.align.dpo),
                                       ("attack", cfg.attack))
                if section.batch_size % n]
    problems += [f"defence '{d.name}' ({d.method}) trains in one process only; set num_processes: 1 "
                 "or drop it" for d in cfg.defences if DEFENCES.info(d.method).meta["single_process"]]
    if problems:
        raise NlsrError("num_processes > 1: " + "; ".join(problems))


def _uses_gpus(device: str | None) -> bool:
    import torch

    if device is not None and not device.startswith("cuda"):
        return False
    return torch.cuda.is_available()


def _process_device(device: str | None, local_rank: int, world_size: int) -> str:
    """The device of this process: its own GPU under a multi-process launch, else as asked."""
    import torch

    if device is not None and not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        if device is not None:
            raise NlsrError(f"device '{device}' was asked for but no CUDA device is visible")
        return "cpu"
    if world_size > 1 or device is None:
        return f"cuda:{local_rank}"
    return device


def run_job(job: TrainingJob) -> dict:
    """Run ``job`` in this process (one of ``WORLD_SIZE`` under a launcher); the stats on every
    process, written to ``job.stats`` by the main one."""
    from nlsr.training.trainers import lora_config, set_seed, train_dpo, train_sft
    from nlsr.weights.models import load_model, load_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    section_cls = DpoSection if job.kind == "dpo" else TrainSection
    section = section_cls(**{k: v for k, v in job.section.items() if k in section_cls.model_fields})
    if section.batch_size % world:
        raise NlsrError(f"batch_size {section.batch_size} cannot be split over {world} processes")
    section = section.model_copy(update={"batch_size": section.batch_size // world})
    rows = [json.loads(line) for line in Path(job.rows).read_text(encoding="utf-8").splitlines() if line.strip()]

    set_seed(job.seed)
    tokenizer = load_tokenizer(job.tokenizer)
    model = load_model(job.model, device=_process_device(job.device, local_rank, world),
                       precision=job.load_precision)
    lora = lora_config(LoraSection(**job.lora)) if job.lora is not None else None
    if job.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job.adapter, is_trainable=True)
    out_dir = Path(job.out_dir)
    if job.kind == "sft":
        stats = train_sft(model, tokenizer, rows, section, out_dir, job.seed, lora=lora, bf16=job.bf16)
    else:
        stats = train_dpo(model, tokenizer, rows, section, out_dir, job.seed, lora=lora, bf16=job.bf16)
    stats = {**stats, "processes": world}
    if rank == 0 and job.stats is not None:
        tmp = Path(job.stats).with_suffix(".partial")
        tmp.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, job.stats)
    return stats


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(job_path: str | os.PathLike, num_processes: int, bf16: bool, port: int | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The ``accelerate launch`` command line of a job with ``num_processes`` processes.

    ``--multi_gpu`` selects accelerate's multi-process launcher (torchrun) on GPU and CPU machines
    alike (``--cpu`` would start one process); on a CPU machine the trainer then joins the processes
    with gloo. The mixed precision is given explicitly so that an accelerate config file cannot
    change what the job's ``bf16`` says."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(num_processes), "--num_machines", "1",
           "--mixed_precision", "bf16" if bf16 else "no", "--dynamo_backend", "no",
           "--main_process_port", str(port if port is not None else _free_port())]
    return [*cmd, *extra_args, "-m", "nlsr.training.distributed", str(job_path)]


def run_training_job(job: TrainingJob, num_processes: int = 1, job_path: str | os.PathLike | None = None,
                     extra_args: Sequence[str] = ()) -> dict:
    """Run ``job`` in this process (``num_processes == 1``) or in ``num_processes`` data-parallel
    processes under ``accelerate launch``; returns the training stats (those of the main process).

    ``job_path`` is where the job JSON is written for the launcher (default: next to ``job.stats``,
    or a temporary folder). ``extra_args`` go to ``accelerate launch`` (e.g. ``--gpu_ids 0,1``).

    Raises:
        NlsrError: a process count the job cannot use, or a launch that failed (its output, printed
            above, says why).
    """
    check_processes(job, num_processes)
    if num_processes == 1:
        return run_job(job)
    with tempfile.TemporaryDirectory(prefix="nlsr-job-") as tmp:
        if job.stats is None:
            job = dataclasses.replace(job, stats=str(Path(tmp) / "stats.json"))
        stats_path = Path(job.stats)
        stats_path.unlink(missing_ok=True)
        path = Path(job_path) if job_path is not None else stats_path.with_name("job.json")
        job.save(path)
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not _uses_gpus(job.device):
            # torchrun would pin every process to one thread; share the cores instead.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
        cmd = launch_command(path, num_processes, job.bf16, extra_args=extra_args)
        result = subprocess.run(cmd, env=env, check=False)
        if result.returncode != 0:
            raise NlsrError(f"the {num_processes}-process training job failed (exit status "
                            f"{result.returncode}; its output is above). Job: {path}; command: {' '.join(cmd)}")
        if not stats_path.exists():
            raise NlsrError(f"the {num_processes}-process training job finished without writing {stats_path}")
        return json.loads(stats_path.read_text(encoding="utf-8"))


def train_stage_job(ctx, kind: str, model: str | os.PathLike, rows: Sequence[dict], section, out_dir: Path,
                    lora=None, adapter: str | os.PathLike | None = None, seed: int | None = None) -> dict:
    """A training stage's job in ``ctx.config.num_processes`` processes; returns the training stats.

    ``model`` is the model to train on (a path or spec), ``lora`` a fresh adapter's
    :class:`~nlsr.training.settings.LoraSection` or ``adapter`` a directory to continue; ``seed`` the training
    seed (default: the context's). The job files live in ``out_dir.parent / ".job"`` while it runs."""
    import shutil

    cfg = ctx.config
    check_config(cfg)
    work = Path(out_dir).parent / ".job"
    job = prepare_job(work, kind, str(model), cfg.model, rows, section, out_dir,
                      ctx.seed if seed is None else seed, lora=lora,
                      adapter=adapter, bf16=ctx.precision.bf16, device=cfg.device)
    stats = run_training_job(job, cfg.num_processes, job_path=work / "job.json")
    shutil.rmtree(work, ignore_errors=True)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: ``python -m nlsr.training.distributed JOB.json`` (normally under ``accelerate launch``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m nlsr.training.distributed JOB.json", file=sys.stderr)
        return 2
    try:
        run_job(TrainingJob.load(args[0]))
    except NlsrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TrainingJob", "check_config", "check_processes", "launch_command", "prepare_job", "run_job",
           "run_training_job", "train_stage_job"]
