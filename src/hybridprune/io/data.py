"""Text sources for calibration, fine-tuning and evaluation.

Every source reads a data directory in the layout of shared/data (``--data-dir`` or ``HYBRIDPRUNE_DATA``)
or, when none is given, the Hugging Face hub through `datasets`.

Offline fallbacks (the data directory has no WikiText-2 train and no SQuAD train):
- calibration on WikiText-2 uses the *validation* split; perplexity is always measured on *test*;
- SQuAD v1.1 dev is split by article, in file order: even-numbered articles (0, 2, 4, ...) are the
  *fit* half (calibration, fine-tuning), odd-numbered ones the *eval* half. Nothing is evaluated on what
  was used to fit.
"""
from __future__ import annotations

import io
import json
import random
from functools import lru_cache
from pathlib import Path

import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.core.specs import (BOS_POLICIES, CALIB_SOURCES, SQUAD_FORMATS, check_bos, generates,  # noqa: F401
                                   data_dir, parse_calib)

LOCAL_FILES = {
    ("wikitext2", "train"): None,
    ("wikitext2", "valid"): "wikitext2/wiki.valid.raw",
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("c4", "train"): "c4/c4_sample.jsonl",
    ("squad", "dev"): "squad/dev-v1.1.json",
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("boolq", "train"): "boolq/train.jsonl",
    ("boolq", "validation"): "boolq/superglue_val.jsonl",
}


def local_file(root: Path, source: str, split: str) -> Path:
    rel = LOCAL_FILES.get((source, split))
    if rel is None:
        raise HybridPruneError(f"no local file for {source} {split} in the data directory layout")
    path = root / rel
    if not path.is_file():
        raise HybridPruneError(f"missing data file {path}; put it there or point --data-dir elsewhere")
    return path


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used, or None. Checked once, so an offline run says so in one line, not per retry.

    With HF_HUB_OFFLINE set the caller reads the local Hugging Face cache, so that is no reason to stop.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} is not reachable ({type(e).__name__}); set HF_HUB_OFFLINE=1 to use the local cache"


def _hub(*args, **kwargs):
    import datasets
    reason = hub_offline_reason()
    if reason:
        raise HybridPruneError(f"cannot load {args[0]} from the Hugging Face hub: {reason}, or pass --data-dir "
                               "(or HYBRIDPRUNE_DATA) with local files")
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ConnectionError) as e:  # network, auth, missing dataset (all OSError subclasses)
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HybridPruneError(f"could not load {args[0]} from the Hugging Face hub ({msg}); "
                               "pass --data-dir (or HYBRIDPRUNE_DATA) with local files") from None


def _text(path: Path) -> str:
    """A data file as UTF-8 text; other bytes are one line naming the file and the line they are on."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise HybridPruneError(f"{path} line {line} is not UTF-8 text (byte {raw[e.start]:#04x}); fix or replace "
                               "the file") from None


def _jsonl(path: Path, fields: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line that is not one, or lacks one of `fields`, is one line
    naming the file and the line."""
    rows = []
    for n, line in enumerate(io.StringIO(_text(path), newline=None), 1):  # lines as open() gives them
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise HybridPruneError(f"{path} line {n} is not valid JSON ({e.msg}); fix or replace the file") \
                from None
        if not isinstance(row, dict):
            raise HybridPruneError(f"{path} line {n} is not a JSON object; fix or replace the file")
        missing = [k for k in fields if not isinstance(row.get(k), str)]
        if missing:
            raise HybridPruneError(f"{path} line {n} has no text field {missing[0]!r} (every line needs "
                                   f"{', '.join(fields)}); fix or replace the file")
        rows.append(row)
    if not rows:
        raise HybridPruneError(f"{path} holds no examples; fix or replace the file")
    return rows


# ----------------------------------------------------------------------------- sources

@lru_cache(maxsize=8)
def wikitext2_rows(split: str, root: Path | None) -> tuple[str, ...]:
    """Rows as the hub's wikitext-2-raw-v1 has them: each line with its newline, blank lines as ''."""
    if root is None:
        hub_split = {"valid": "validation"}.get(split, split)
        return tuple(_hub("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"])
    if split == "train":
        split = "valid"  # documented offline fallback: there is no train file
    text = _text(local_file(root, "wikitext2", split))
    return tuple(line if line.strip() else "" for line in io.StringIO(text, newline=""))  # as open(newline="")


def wikitext2_text(split: str, root: Path | None) -> str:
    """The papers' convention: rows joined with a blank line."""
    return "\n\n".join(wikitext2_rows(split, root))


def c4_texts(root: Path | None) -> list[str]:
    if root is None:
        ds = _hub("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        return list(ds["text"][:20000])
    return [r["text"] for r in _jsonl(local_file(root, "c4", "train"), ("text",))]


@lru_cache(maxsize=4)
def _squad_dev(root: Path) -> tuple[dict, ...]:
    """SQuAD v1.1's articles, each checked to hold what the readers take."""
    path = local_file(root, "squad", "dev")
    try:
        data = json.loads(_text(path))
    except ValueError as e:
        raise HybridPruneError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list) or not articles:
        raise HybridPruneError(f"{path} holds no articles (a SQuAD file has {{\"data\": [articles]}}); fix or "
                               "replace the file")
    for i, article in enumerate(articles):
        ok = isinstance(article, dict) and isinstance(article.get("title"), str) and \
            isinstance(article.get("paragraphs"), list) and all(
                isinstance(p, dict) and isinstance(p.get("context"), str) and isinstance(p.get("qas"), list) and
                all(isinstance(q, dict) and isinstance(q.get("question"), str) and "id" in q and
                    isinstance(q.get("answers"), list) and all(isinstance(a, dict) and "text" in a
                                                               for a in q["answers"]) for q in p["qas"])
                for p in article["paragraphs"])
        if not ok:
            raise HybridPruneError(f"{path}: article {i} lacks SQuAD's fields (title, paragraphs with context and "
                                   "qas: id, question, answers with text); fix or replace the file")
    return tuple(articles)


def squad_examples(part: str, root: Path | None) -> list[dict]:
    """SQuAD v1.1 questions as {id, title, context, question, answers}. part: fit | eval."""
    if part not in ("fit", "eval"):
        raise ValueError(part)
    if root is None:
        ds = _hub("rajpurkar/squad", split="train" if part == "fit" else "validation")
        return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                 "answers": list(r["answers"]["text"])} for r in ds]
    out = []
    for i, article in enumerate(_squad_dev(root)):
        if (i % 2 == 0) != (part == "fit"):
            continue
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                out.append({"id": qa["id"], "title": article["title"], "context": para["context"],
                            "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]})
    return out


def gsm8k_examples(split: str, root: Path | None) -> list[dict]:
    if root is None:
        return [dict(r) for r in _hub("openai/gsm8k", "main", split=split)]
    return _jsonl(local_file(root, "gsm8k", split), ("question", "answer"))


def boolq_examples(split: str, root: Path | None) -> list[dict]:
    """BoolQ as {question, passage, label: bool}; the local SuperGLUE copy stores labels as strings."""
    if root is None:  # SuperGLUE's copy for every split: the fields (and passage form) the eval prompt uses
        rows = _hub("aps/super_glue", "boolq", split=split)
        return [{"question": r["question"], "passage": r["passage"], "label": bool(r["label"])} for r in rows]
    out = []
    path = local_file(root, "boolq", split)
    for n, r in enumerate(_jsonl(path, ("question", "passage")), 1):
        label = r.get("label", r.get("answer"))
        if label is None:
            raise HybridPruneError(f"{path}: example {n} has no 'label' (or 'answer'); fix or replace the file")
        label = label if isinstance(label, bool) else str(label).lower() == "true"
        passage = r["passage"]
        if "title" in r and split == "train":
            passage = f"{r['title']} -- {passage}" if r.get("title") else passage
        out.append({"question": r["question"], "passage": passage, "label": label})
    return out


# ----------------------------------------------------------------------------- BOS

def tokenizer_adds_bos(tokenizer) -> bool:
    """True if the tokenizer itself puts a BOS token in front of encoded text (Gemma, Llama-2, OPT do;
    GPT-2-style tokenizers such as SmolLM2's do not). Probed by encoding, which follows add_bos_token and the
    post-processor alike."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_bos(tokenizer, policy: str = "auto") -> str:
    """'always' (every window / sequence starts with BOS) or 'papers' (text tokenized once as the tokenizer does,
    then cut: only the very start can carry a BOS, the Wanda/SparseGPT convention). 'auto' asks the tokenizer:
    a model whose tokenizer adds BOS was trained with it on every sequence (measured on Gemma-3-270M: windows
    without it score ~50% higher perplexity), one whose tokenizer does not keeps the papers' convention."""
    check_bos(policy)
    if policy == "always" and getattr(tokenizer, "bos_token_id", None) is None:
        raise HybridPruneError("--bos always needs a tokenizer with a BOS token; use --bos papers")
    if policy == "auto":
        return "always" if tokenizer_adds_bos(tokenizer) else "papers"
    return policy


def text_ids(tokenizer, text: str, bos: str) -> list[int]:
    """Token ids of running text: with 'always' without special tokens (each window gets its own BOS)."""
    return tokenizer(text, add_special_tokens=(bos != "always"))["input_ids"]


def cut_windows(ids: torch.Tensor, seqlen: int, bos_id: int | None, n: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens; with a BOS id each is BOS + seqlen - 1 text tokens."""
    step = seqlen - 1 if bos_id is not None else seqlen
    count = ids.numel() // step if n is None else min(n, ids.numel() // step)
    w = ids[: count * step].reshape(count, step)
    if bos_id is not None:
        w = torch.cat([torch.full((count, 1), bos_id, dtype=w.dtype), w], 1)
    return w


# ----------------------------------------------------------------------------- calibration

def calibration_texts(source: str, root: Path | None, squad_format: str = "context_question"):
    """('continuous', text) for running text, or ('examples', [texts]) for datasets of examples.

    Answers never enter calibration text: SQuAD gives context (+ question), GSM8K the question, BoolQ the
    passage and question.
    """
    if source == "wikitext2":
        return "continuous", wikitext2_text("train", root)
    if source == "c4":
        return "continuous", "\n\n".join(c4_texts(root))
    if source == "squad":
        if squad_format not in SQUAD_FORMATS:
            raise HybridPruneError(f"unknown --squad-format {squad_format!r}; use one of: {', '.join(SQUAD_FORMATS)}")
        fmt = SQUAD_FORMATS[squad_format]
        rows = squad_examples("fit", root)
        if squad_format == "context":  # one text per paragraph, not one per question
            rows = list({r["context"]: r for r in rows}.values())
        return "examples", [fmt.format(**r) for r in rows]
    if source == "gsm8k":
        return "examples", [f"Question: {r['question']}" for r in gsm8k_examples("train", root)]
    if source == "boolq":
        return "examples", [f"{r['passage']}\nQuestion: {r['question']}?" for r in boolq_examples("train", root)]
    raise HybridPruneError(f"unknown calibration source {source!r}; use one of: {', '.join(CALIB_SOURCES)} "
                           "or mixed:a=0.5,b=0.5")


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder rounding: integer counts proportional to weights that add up to total."""
    raw = [total * w for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos_id, dtype=windows.dtype), windows], 1)


def _windows_continuous(ids: torch.Tensor, n: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise HybridPruneError(f"calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()]) if n else ids.new_zeros(0, seqlen)


def _windows_packed(texts: list[str], tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Examples (each followed by EOS) packed back to back into full windows: no padding anywhere."""
    need, buf, rng, epoch = n * seqlen, [], random.Random(seed), 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    order = list(range(len(texts)))
    while len(buf) < need:
        rng.shuffle(order)
        for i in order:
            buf.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"] + eos)
            if len(buf) >= need:
                break
        epoch += 1
        if epoch > 1000:
            raise HybridPruneError("calibration examples are empty; check the data files")
    return torch.tensor(buf[:need], dtype=torch.long).reshape(n, seqlen)


@lru_cache(maxsize=4)
def _tokenized(text: str, tokenizer, bos: str = "papers") -> torch.Tensor:
    return torch.tensor(text_ids(tokenizer, text, bos), dtype=torch.long)


def source_windows(tokenizer, source: str, n: int, seqlen: int, seed: int, root: Path | None,
                   squad_format: str = "context_question", bos: str = "auto") -> torch.Tensor:
    """[n, seqlen] windows of one file source (random windows of running text, or examples packed back to back);
    the same arguments give the same windows."""
    bos = resolve_bos(tokenizer, bos)
    bos_id = tokenizer.bos_token_id if bos == "always" else None
    body = seqlen - 1 if bos_id is not None else seqlen
    kind, payload = calibration_texts(source, root, squad_format)
    if kind == "continuous":
        gen = torch.Generator().manual_seed(seed)
        return _with_bos(_windows_continuous(_tokenized(payload, tokenizer, bos), n, body, gen), bos_id)
    return _with_bos(_windows_packed(payload, tokenizer, n, body, seed), bos_id)


def calibration_samples(tokenizer, spec: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        data_dir_path=None, squad_format: str = "context_question", bos: str = "auto",
                        select: str = "random", pool: int | None = None) -> torch.Tensor:
    """[nsamples, seqlen] token ids; same arguments, same samples.

    bos (see resolve_bos): with 'always' every window is BOS + seqlen - 1 tokens of text.
    select='diversity': draw `pool` windows at random, then keep the nsamples that cover the most distinct tokens
    (select_diverse). Sources the model generates are drawn by pruning.calibration, not here.
    """
    if nsamples < 1 or seqlen < 2:
        raise HybridPruneError(f"need --nsamples >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    if generates(spec):
        raise HybridPruneError(f"{spec!r} is text the model generates; draw it with pruning.calibration.draw")
    if select == "diversity":
        pool = pool or 4 * nsamples
        if pool < nsamples:
            raise HybridPruneError(f"--calib-pool {pool} is smaller than --nsamples {nsamples}")
        candidates = calibration_samples(tokenizer, spec, pool, seqlen, seed, data_dir_path, squad_format, bos)
        return candidates[select_diverse(candidates, nsamples)]
    root = data_dir(data_dir_path)
    parts = parse_calib(spec)
    counts = split_counts(nsamples, [w for _, w in parts])
    chunks = []
    for j, ((source, _), n) in enumerate(zip(parts, counts)):
        if n:
            chunks.append(source_windows(tokenizer, source, n, seqlen, seed * 1000 + j, root, squad_format, bos))
    return interleave(chunks, seed)


def interleave(chunks: list[torch.Tensor], seed: int) -> torch.Tensor:
    """The parts of a mixture in one seeded order, so that every micro-batch sees the mixture."""
    out = torch.cat(chunks)
    if len(chunks) > 1:
        out = out[torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))]
    return out


# ----------------------------------------------------------------------------- selection

def lexical_coverage(windows: torch.Tensor) -> int:
    """The diversity score of a set of windows: how many distinct token ids they contain together."""
    return int(torch.unique(windows).numel())


def select_diverse(windows: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of n windows chosen greedily to maximise lexical_coverage: each step takes the window that adds the
    most token ids not yet covered (ties: the earlier window). A greedy cover keeps at least 1 - 1/e of the best
    set's score; in the spirit of ZipCal (2026), which selects calibration text for lexical diversity, with a score
    of our own. Returned in the pool's order."""
    if n > len(windows):
        raise HybridPruneError(f"a pool of {len(windows)} windows cannot give {n}")
    uniq = [torch.unique(w) for w in windows]
    owner = torch.cat([torch.full((len(u),), i) for i, u in enumerate(uniq)])
    flat = torch.cat(uniq)
    covered = torch.zeros(int(flat.max()) + 1, dtype=torch.bool)
    taken = torch.zeros(len(windows), dtype=torch.bool)
    for _ in range(n):
        gain = torch.zeros(len(windows)).index_add_(0, owner, (~covered[flat]).float())
        gain[taken] = -1
        best = int(torch.argmax(gain))  # argmax returns the first maximum
        taken[best] = True
        covered[uniq[best]] = True
    return torch.nonzero(taken).flatten()
