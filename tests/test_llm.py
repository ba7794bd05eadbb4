"""The small causal LM of the one-shot results: data, tokenizer, perplexity, and one-shot memory bounds."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from experiments.llm import CausalLM, _strip_markup, bbc_splits, loader, pack, train_tokenizer, wikipedia_texts
from lightning_prune import oneshot


def tiny_llama(vocab: int = 300, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_held_out_splits_share_no_text_with_training():
    splits = bbc_splits()
    assert len(splits["train"]) == 1558, "the classifiers' training split"
    assert (len(splits["val"]), len(splits["test"])) == (207, 405), "repeated texts dropped (of 223 and 444)"
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["train"]) & set(splits["val"])
    assert not set(splits["val"]) & set(splits["test"])
    assert len(set(splits["test"])) == len(splits["test"])


def test_tokenizer_and_packing_round_trip():
    texts = bbc_splits()["train"][:40]
    tok = train_tokenizer(texts, 400)
    assert len(tok) == 400
    ids = pack(texts[:5], tok, seq_len=32)
    assert ids.shape[1] == 32 and ids.dtype == torch.int64
    flat = ids.flatten().tolist()
    assert flat.count(tok.eos_token_id) >= 1, "articles are joined by end-of-text tokens"
    first = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert flat[: len(first)] == first[: len(flat)]
    assert tok.decode(first) == texts[0], "byte-level BPE loses nothing"


def test_wikipedia_sample_is_read_from_the_gensim_wheel_without_markup():
    pages = wikipedia_texts()
    assert len(pages) == 106, "206 pages in the file, of which 100 are redirects"
    assert all("[[" not in p and "{{" not in p and "<ref" not in p for p in pages)
    assert pages[0].startswith("Anarchism")


def test_strip_markup():
    text = "'''Bold''' [[Link|shown]] and [[plain]]{{cite|x={{y}}}}<ref>r</ref> [http://a.b label] ==H=="
    assert _strip_markup(text) == "Bold shown and plain label H"


def test_perplexity_in_trainer_test_is_exp_of_the_mean_token_cross_entropy():
    llm = tiny_llama()
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    module = CausalLM(llm)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    ppl = trainer.test(module, loader(ids, 4), verbose=False)[0]["test/ppl"]
    with torch.no_grad():
        logits = llm(input_ids=ids).logits[:, :-1]
        ce = nn.functional.cross_entropy(logits.reshape(-1, 300), ids[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(float(ce)), rel=1e-4)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_one_shot_holds_one_blocks_statistics_and_one_boundarys_activations_at_a_time(monkeypatch, method):
    llm = tiny_llama(layers=3).eval()
    live: list[int] = []
    peak = {"stats": 0}
    original = oneshot._Statistics

    class Counted(original):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            live.append(id(self))
            peak["stats"] = max(peak["stats"], len(live))
            self.handle.remove = self._removed(self.handle.remove)

        def _removed(self, remove):
            def wrapped() -> None:
                remove()
                live.remove(id(self))

            return wrapped

    monkeypatch.setattr(oneshot, "_Statistics", Counted)
    batches = [
        {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    masks = oneshot.prune_oneshot(llm, batches, method, 0.5, exclude="lm_head")
    assert len(masks) == 3 * 7
    assert peak["stats"] == 7, "the 7 Linears of one decoder layer at a time, never two layers' statistics"
    assert not live


@pytest.mark.slow
def test_minilm_one_shot_rows_smoke():
    from experiments.oneshot_results import minilm_rows

    rows = minilm_rows(max_length=16, calibration=16, subset=60)
    assert len(rows) == 1 + 3 * 5
    assert rows[0]["cosine"] == 1.0
    for row in rows[1:]:
        assert row["sparsity"] == pytest.approx(row["target"], abs=0.01)
        assert 0.0 < row["cosine"] < 1.0 and 0.0 <= row["accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_a_kv_cache_changes_nothing_and_the_config_is_restored(method):
    batches = [
        {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    results = []
    for use_cache in (False, True):
        llm = tiny_llama(layers=3)
        llm.config.use_cache = use_cache
        masks = oneshot.prune_oneshot(llm, batches, method, 0.5, exclude="lm_head")
        assert llm.config.use_cache is use_cache
        results.append((masks, {n: p.detach().clone() for n, p in llm.named_parameters()}))
    (masks, weights), (cached_masks, cached_weights) = results
    for name in masks:
        assert torch.equal(masks[name], cached_masks[name]), name
    for name in weights:
        assert torch.equal(weights[name], cached_weights[name]), name
