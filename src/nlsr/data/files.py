"""The offline data files that several data sets read, relative to the data directory.

See each folder's SOURCES.md in the data directory for where the files come from.
"""

SPARD = "beavertails_derived_spard"
SPARD_TRAIN = f"{SPARD}/train_beaverTails_train.jsonl"
SPARD_TEST = f"{SPARD}/eval_beaverTails_test.jsonl"
SPARD_LAT = f"{SPARD}/eval_LatHarmful_test.jsonl"
STL_SAFETY = "safety_tuned_llamas/safety_only_data_Instructions.json"
PKU_SFT = "pku_saferlhf_derived/pku_safe_sft.json"
PKU_DPO = "pku_saferlhf_derived/pku_seferlhf_realign_dpo_5k.json"
NLSR_POISON = "nlsr_finetune/sst2/train_merged_n1000_p0.2.json"
SST2_TRAIN = ("sst2/alps_train.tsv", "sst2/alps_dev.tsv")
SST2_VAL = "nlsr_finetune/sst2/val.json"
AG_NEWS_TRAIN = "ag_news/alps_dev_from_train.tsv"
AG_NEWS_TEST = "nlsr_finetune/ag_news/test.json"
GSM8K_TRAIN = "gsm8k/train.jsonl"
GSM8K_TEST = "nlsr_finetune/gsm8k/test.json"
