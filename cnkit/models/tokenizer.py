"""An offline CLIP tokenizer for the tiny model: CLIP's byte-level BPE, with merges learned here.

SD's tokenizer (``openai/clip-vit-large-patch14``) comes from a hub, which the kit may not reach.
``transformers.CLIPTokenizer`` only needs ``vocab.json`` and ``merges.txt``, so we write both:

- the 512 base symbols of CLIP's vocabulary (each of the 256 byte characters, with and without the
  end-of-word marker ``</w>``), so any text tokenizes without an unknown token;
- BPE merges learned greedily (most frequent pair first, ties broken alphabetically) on the toy
  world's words until each is a single token, so prompts become one token per word;
- CLIP's two special tokens last, as in the original vocabulary.

Learning is deterministic, so the same word list always gives byte-identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # SD 1.5's prompt length, so pipelines pad and truncate as they do for SD


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte-to-character table: printable bytes map to themselves, the rest above 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def learn_merges(words) -> list[tuple[str, str]]:
    """Greedy BPE over a word list until every word is one symbol."""
    byte_char = bytes_to_unicode()
    seqs = {}
    for w in sorted(set(words)):
        chars = [byte_char[b] for b in w.lower().encode("utf-8")]
        chars[-1] += "</w>"
        seqs[w] = chars
    merges = []
    while True:
        pairs = Counter()
        for seq in seqs.values():
            pairs.update(zip(seq, seq[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out


def write_tokenizer_files(folder, words) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges = learn_merges(words)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    # CLIPTokenizer skips the first line of merges.txt (a version header in the original).
    (folder / "merges.txt").write_text("#version: 0.2 (cnkit)\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def build_tokenizer(words, folder) -> CLIPTokenizer:
    """A stock ``CLIPTokenizer`` over ``words`` (files written to ``folder``), SD's special tokens."""
    folder = write_tokenizer_files(folder, words)
    # from_pretrained reads vocab.json/merges.txt the same way in transformers 4 and 5.
    return CLIPTokenizer.from_pretrained(str(folder), bos_token=BOS, eos_token=EOS, unk_token=EOS,
                                         pad_token=EOS, model_max_length=MAX_LENGTH)
