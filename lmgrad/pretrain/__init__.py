"""Local checkpoint series: models trained from scratch on a text corpus, every saved step a Hugging
Face directory (`lmgrad.jobs.pretrain` runs it; this package holds the pure parts).

* `data`: corpus → byte-level BPE → memory-mapped token file → packed windows, seeded data order.
* `model`: `transformers` config → Flax module → params; export as a Hugging Face directory.
* `train`: loss, AdamW with warmup + cosine decay, train/eval steps, checkpoint schedule.
"""

from lmgrad.pretrain.data import EOT, CorpusError, TokenData, tokenize_corpora, train_tokenizer
from lmgrad.pretrain.model import export_hf, hf_config, init_params
from lmgrad.pretrain.train import checkpoint_steps, make_train_step, optimizer

__all__ = ["EOT", "CorpusError", "TokenData", "checkpoint_steps", "export_hf", "hf_config", "init_params",
           "make_train_step", "optimizer", "tokenize_corpora", "train_tokenizer"]
