"""What a classification answer predicts, and the label-shift diagnostic built on it."""

import json
import subprocess
import sys
from pathlib import Path

from nlsr.data.tasks import AG_NEWS_LABELS, SST2_LABELS, first_label


def test_first_label_is_the_first_whole_word_class_name():
    assert first_label("Positive.", SST2_LABELS) == "positive"
    assert first_label("negative, not positive", SST2_LABELS) == "negative"
    assert first_label("It is a positive review; negative words appear", SST2_LABELS) == "positive"
    assert first_label("I cannot answer that.", SST2_LABELS) is None
    assert first_label("nonnegative", SST2_LABELS) is None                     # whole words only
    assert first_label("This is about Sci/Tech, not World", AG_NEWS_LABELS) == "Sci/Tech"


def test_label_shift_script_counts_predictions_and_errors_by_gold_label(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"params": {"task": "sst2"}}))
    gold = ["positive", "negative", "negative", "positive", "negative"]
    splits = ["test", "test", "test", "test", "validation"]
    (run / "data" / "task_eval.jsonl").write_text("".join(
        json.dumps({"instruction": "x", "input": str(i), "label": g, "split": s}) + "\n"
        for i, (g, s) in enumerate(zip(gold, splits, strict=True))))
    answers = {"attacked": ["positive", "negative", "negative", "negative", "positive"],
               "nlsr": ["positive", "positive", "Positive!", "sorry", "negative"]}
    for model, outs in answers.items():
        folder = run / f"evaluate-{model}-s0"
        folder.mkdir()
        (folder / "generations.jsonl").write_text("".join(
            json.dumps({"set": s, "output": o}) + "\n" for s, o in [("harmful", "no")] + [("task", o) for o in outs]))
    script = Path(__file__).resolve().parents[1] / "results" / "cpu-bench" / "label_shift.py"
    out = subprocess.run([sys.executable, str(script), str(run), "attacked", "nlsr"], capture_output=True,
                         text=True, check=True).stdout
    assert "sst2, 4 test rows, gold: negative 2, positive 2" in out
    assert "| attacked | 0 | 3 | 1 | 0 | 0 | 1 |" in out       # one gold-positive row called negative
    assert "| nlsr | 0 | 0 | 3 | 1 | 2 | 1 |" in out           # both negatives called positive, one non-answer
