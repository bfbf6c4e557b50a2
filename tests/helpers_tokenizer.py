"""A tiny real tokenizer built offline, for tests that need one (no hub downloads).

A byte-level BPE trained in ~0.1 s on a few hundred BLiMP sentences, wrapped in
`transformers.PreTrainedTokenizerFast`. Byte-level means every string encodes (no
unknown tokens); the merges make common words single tokens and rare ones several, as
with GPT-2. Special tokens take the first ids: ``<pad>``=0 (= `lmgrad.tasks.PAD_ID`),
``<bos>``=1, ``<eos>``=2.

    tok = tiny_tokenizer()                       # bos and eos
    tok = tiny_tokenizer(bos=False)              # GPT-2 style: eos only
    tok.save_pretrained(tmp_path)                # a tokenizer directory for loaders
"""
from __future__ import annotations

import functools

SPECIAL = ("<pad>", "<bos>", "<eos>")


@functools.lru_cache(maxsize=None)
def _trained_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmgrad.tasks import load_blimp

    texts = []
    for task in load_blimp(["adjunct_island", "passive_1", "principle_A_case_2",
                            "determiner_noun_agreement_1", "npi_present_1"]):
        for p in task.pairs[:60]:
            texts += [p.sentence_good, p.sentence_bad]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(*, bos: bool = True, eos: bool = True, vocab_size: int = 512):
    """A fresh `PreTrainedTokenizerFast`; `bos` / `eos` choose which special tokens it
    declares (the ids exist in the vocabulary either way)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    kwargs = {"pad_token": "<pad>"}
    if bos:
        kwargs["bos_token"] = "<bos>"
    if eos:
        kwargs["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size)), **kwargs
    )


def save_tiny_llama(path, *, num_hidden_layers: int = 1) -> None:
    """A seeded random tiny Llama (GQA 4/2 heads, d=32) with `tiny_tokenizer()`, saved to `path`
    as a Hugging Face directory (config.json, safetensors, tokenizer)."""
    import torch
    import transformers

    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
