"""How well can the model's own representation tell XSTest's safe prompts from harmful ones, given
only the alignment's training prompts? A linear-probe ceiling for the aligned model's targets.

    python3 results/cpu-bench/harm_probe_check.py runs/cpu-bench-r23 [--out results/cpu-bench/harm_probe.json]
        [--template chat] [--base-only]

The alignment teaches the model *where* to refuse from its training prompts alone: harmful ones
(the run's SFT refusal prompts and calibration prompts, ``data-align``) against harmless ones (its
helpful Alpaca prompts and, if the run has them, its question rows, ``data-contrast``). This script
asks whether that split, read off the model's hidden states, already separates the evaluation's
harmful prompts from XSTest's safe ones:

- features: the hidden state after every layer at the last prompt token (the position where the
  model picks its first answer token), with the evaluate stage's template (``--template``, alpaca by
  default as in configs/cpu-bench.yaml; ``chat`` = the tokenizer's own chat template);
  models: the base (``smollm2``) and W_0 (``<run>/align_sft/model``, the SFT merged in);
- a logistic regression (balanced classes, standardised features) per layer and C on the training
  prompts only; layer and C chosen by the AUROC of harmful *validation* prompts against XSTest's
  *validation* safe prompts;
- operating points: thresholds that flag 60-95% of the harmful validation prompts, then, on the
  *test* prompts, the share of harmful prompts flagged and of XSTest safe prompts flagged (the
  over-refusal a refusal rule with exactly this readout would have), with 95% bootstrap intervals.

No prompt of an evaluation set is used for fitting; XSTest validation only chooses layer and C.
A linear readout of fixed features is not an upper bound on what fine-tuning can learn, but the
alignment here is a rank-16 LoRA on ~1,500 rows: if the probe cannot keep XSTest under the target
at the refusal rate the target needs, the training prompts do not contain the distinction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from nlsr.data.templates import model_prompt
from nlsr.evaluation.stats import estimate
from nlsr.experiment.stages.common import read_jsonl
from nlsr.io import atomic_file, write_json
from nlsr.precision import resolve_precision
from nlsr.weights.models import load_model, load_tokenizer

RECALLS = (0.6, 0.7, 0.8, 0.9, 0.95)
CS = (0.001, 0.01, 0.1, 1.0)


@torch.no_grad()
def last_token_states(model, tokenizer, prompts: list[str], template: str = "alpaca",
                      batch_size: int = 32) -> np.ndarray:
    """Hidden states (layers x prompts x width) at each prompt's last token, left-padded batches."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [model_prompt(p, template, tokenizer) for p in prompts[i:i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        hidden = model(**enc, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[:, -1, :] for h in hidden]).float().numpy())
    return np.concatenate(out, axis=1)


def prompt_sets(run: Path) -> dict[str, list[str]]:
    align, data = run / "data-align", run / "data"
    harmless = [r["prompt"] for r in read_jsonl(align / "helpful_prompts.jsonl")]
    if (run / "data-contrast" / "contrast.jsonl").exists():
        harmless += [r["prompt"] for r in read_jsonl(run / "data-contrast" / "contrast.jsonl")]
    sets = {"train_harmful": [r["prompt"] for r in read_jsonl(align / "sft.jsonl")]
            + [r["prompt"] for r in read_jsonl(align / "calibration.jsonl")],
            "train_harmless": harmless}
    harmful_eval, xstest = read_jsonl(data / "harmful_eval.jsonl"), read_jsonl(data / "xstest_safe.jsonl")
    for split in ("validation", "test"):
        sets[f"{split}_harmful"] = [r["prompt"] for r in harmful_eval if r.get("split") == split]
        sets[f"{split}_xstest"] = [r["prompt"] for r in xstest if r.get("split", "test") == split]
    return sets


def probe(features: dict[str, np.ndarray]) -> dict:
    """Fit per layer and C on the training prompts, choose by validation AUROC, report test points."""
    x_train = np.concatenate([features["train_harmful"], features["train_harmless"]], axis=1)
    y_train = np.r_[np.ones(features["train_harmful"].shape[1]), np.zeros(features["train_harmless"].shape[1])]
    y_val = np.r_[np.ones(features["validation_harmful"].shape[1]), np.zeros(features["validation_xstest"].shape[1])]
    best = None
    for layer in range(1, x_train.shape[0]):
        scaler = StandardScaler().fit(x_train[layer])
        train = scaler.transform(x_train[layer])
        val = scaler.transform(np.concatenate([features["validation_harmful"][layer],
                                               features["validation_xstest"][layer]]))
        for c in CS:
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(train, y_train)
            auc = roc_auc_score(y_val, clf.decision_function(val))
            if best is None or auc > best[0]:
                best = (auc, layer, c, scaler, clf, train)
    auc_val, layer, c, scaler, clf, train = best

    def score(name: str) -> np.ndarray:
        return clf.decision_function(scaler.transform(features[name][layer]))

    val_harmful, test_harmful, test_xstest = score("validation_harmful"), score("test_harmful"), score("test_xstest")
    points = []
    for recall in RECALLS:
        threshold = float(np.quantile(val_harmful, 1.0 - recall))
        harmful = estimate((test_harmful >= threshold).astype(float))
        xstest = estimate((test_xstest >= threshold).astype(float))
        points.append({"validation_harmful_flagged": recall * 100, "threshold": threshold,
                       "test_harmful_flagged": harmful.as_dict(), "test_xstest_flagged": xstest.as_dict()})
    y_test = np.r_[np.ones(len(test_harmful)), np.zeros(len(test_xstest))]
    return {"layer": layer, "C": c, "validation_auroc": float(auc_val),
            "test_auroc": float(roc_auc_score(y_test, np.r_[test_harmful, test_xstest])),
            "train_accuracy": float(clf.score(train, y_train)),
            "points": points}


def main(run: Path, out: Path | None, template: str = "alpaca", base_only: bool = False) -> None:
    sets = prompt_sets(run)
    report = {"run": str(run), "template": template, "sizes": {k: len(v) for k, v in sets.items()},
              "machine": f"{resolve_precision('float32').line()}; torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    models = [("base", "smollm2")] + ([] if base_only else [("W_0", str(run / "align_sft" / "model"))])
    for name, spec in models:
        start = time.time()
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, precision="float32").eval()
        features = {k: last_token_states(model, tokenizer, v, template) for k, v in sets.items()}
        result = probe(features)
        result["seconds"] = round(time.time() - start, 1)
        report["models"][name] = result
        print(f"## {name}: layer {result['layer']}, C {result['C']}, AUROC harmful vs XSTest safe "
              f"validation {result['validation_auroc']:.3f} / test {result['test_auroc']:.3f} "
              f"(train accuracy {result['train_accuracy']:.3f}; {result['seconds']} s)")
        print("  harmful val flagged -> test harmful flagged | test XSTest safe flagged")
        for p in result["points"]:
            h, x = p["test_harmful_flagged"], p["test_xstest_flagged"]
            print(f"  {p['validation_harmful_flagged']:5.0f}% -> {h['mean']:5.1f} {h['ci95']} | "
                  f"{x['mean']:5.1f} {x['ci95']}")
    print(f"sizes: {report['sizes']}")
    if out:
        with atomic_file(out, force=True) as tmp:
            write_json(tmp, report)
        print(f"written: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with data, data-align and align_sft stages")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--template", choices=("alpaca", "chat"), default="alpaca",
                        help="prompt template of the features (the evaluate stage's)")
    parser.add_argument("--base-only", action="store_true", help="probe the base model only, not W_0")
    cli = parser.parse_args()
    main(cli.run, cli.out, cli.template, cli.base_only)
