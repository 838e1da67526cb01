"""Widening a base's vocabulary: a new tokenizer for more words, the trained text encoder carried over to it.

The first embedded base read eight colour words; the real Fill50K's prompts use 106 (140 CSS/X11 names split into
words). Retraining the text encoder from nothing would throw away what it learned, so a warm start keeps it:

- the new tokenizer (``cnkit.models.tokenizer``, one whole-word token per word of the new word list) shares the
  old one's byte symbols and every whole word both know; those tokens keep their trained embeddings, found by
  token text (ids differ between the two vocabularies);
- a new token starts at random, at the scale of the trained rows; or, for a colour word, from its colour
  (``colour_init``): a least-squares linear map from CIELAB to embedding, fitted on the colour words the old
  encoder already knows (the base's own colour geometry), places each new colour word where its colours' mean
  CIELAB value falls (a word like "dark" or "golden" at the mean of the colours whose names contain it);
- ``text_layers`` beyond the old count are appended as identities (their attention and MLP output projections
  zero), so the widened encoder computes what the old one did until training moves them.

Everything else (positions, layers, the final norm) is copied. The result is a stock ``CLIPTextModel`` and
``CLIPTokenizer``: the stock pipeline loads the base as before.
"""

from __future__ import annotations

import re
import tempfile

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..colours import X11, srgb_to_lab
from .tokenizer import build_tokenizer


def word_colours(words) -> dict[str, np.ndarray]:
    """CIELAB value of each word that names (part of) an X11 colour: the mean over the colours it appears in."""
    out = {}
    for word in words:
        values = [rgb for name, rgb in X11.items() if word in name.split()]
        if values:
            out[word] = srgb_to_lab(np.asarray(values, dtype=np.float64)).mean(0)
    return out


def _token_rows(tokenizer, words) -> dict[str, int]:
    """word -> id of its whole-word token, for the words the tokenizer reads as one token."""
    rows = {}
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1:
            rows[word] = ids[0]
    return rows


def widen(text_encoder: CLIPTextModel, old_tokenizer, words, folder=None, colour_init: bool = False,
          text_layers: int = 0, seed: int = 0) -> tuple[CLIPTextModel, object, dict]:
    """(new text encoder, new tokenizer, report) for ``words`` (see the module docstring). ``folder``: where the
    new tokenizer's files go (a temporary folder if None). The report says how many rows were carried, placed by
    colour and drawn at random."""
    if folder is None:
        folder = tempfile.mkdtemp(prefix="cnkit-tokenizer-")
    tokenizer = build_tokenizer(words, folder)
    old = text_encoder.config
    layers = max(text_layers or old.num_hidden_layers, old.num_hidden_layers)
    config = CLIPTextConfig(**{**old.to_dict(), "vocab_size": len(tokenizer), "num_hidden_layers": layers,
                               "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                               "pad_token_id": tokenizer.pad_token_id})
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the appended layers' fresh weights: from ``seed``, the caller's RNG kept
        torch.manual_seed(seed)
        new = CLIPTextModel(config)
    old_state, state = text_encoder.state_dict(), new.state_dict()
    emb_key = next(k for k in state if k.endswith("token_embedding.weight"))
    old_emb = old_state[emb_key].float()
    for key, value in state.items():
        if key != emb_key and key in old_state and old_state[key].shape == value.shape:
            state[key] = old_state[key].clone()
    for key in state:  # appended layers: identities until trained
        m = re.search(r"layers\.(\d+)\.(self_attn\.out_proj|mlp\.fc2)\.", key)
        if m and int(m.group(1)) >= old.num_hidden_layers:
            state[key] = torch.zeros_like(state[key])
    # token rows: carried by token text, else random at the trained rows' scale, or placed by colour
    old_vocab, new_vocab = old_tokenizer.get_vocab(), tokenizer.get_vocab()
    scale = float(old_emb.std())
    emb = torch.randn(len(tokenizer), config.hidden_size, generator=g) * scale
    carried = 0
    for token, i in new_vocab.items():
        if token in old_vocab and old_vocab[token] < len(old_emb):
            emb[i] = old_emb[old_vocab[token]]
            carried += 1
    placed = []
    if colour_init:
        known = _token_rows(old_tokenizer, words)
        lab = word_colours(words)
        fit_words = [w for w in known if w in lab]
        if len(fit_words) >= 4:  # a linear map Lab -> embedding needs at least 4 points (3 + bias)
            a = np.c_[np.stack([lab[w] for w in fit_words]), np.ones(len(fit_words))]
            y = old_emb[[known[w] for w in fit_words]].numpy()
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            new_rows = _token_rows(tokenizer, words)
            for word, value in lab.items():
                if word not in known and word in new_rows:
                    emb[new_rows[word]] = torch.from_numpy(np.r_[value, 1.0] @ coef).float()
                    placed.append(word)
    state[emb_key] = emb
    new.load_state_dict(state)
    report = {"vocabulary": len(tokenizer), "carried_rows": carried, "colour_placed_words": len(placed),
              "random_rows": len(tokenizer) - carried - len(placed), "text_layers": layers,
              "old_text_layers": old.num_hidden_layers}
    return new, tokenizer, report


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` the tokenizer does not read as one whole-word token: a base whose tokenizer was built
    from a word list (the embedded base) never saw them as words, so it cannot know what they mean."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return [w for w in dict.fromkeys(words) if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]


# The kit's word-list tokenizers hold CLIP's 512 byte symbols, its 2 special tokens and one merge per step towards
# each word of their list: a few hundred to a few thousand tokens. SD's CLIP tokenizer holds 49,408.
WORD_LIST_MAX_TOKENS = 8192


def word_list_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` was built from a word list (``cnkit.models.tokenizer``, as the embedded base's is): a
    small vocabulary that reads the toy world's words ("circle", "background") as one token each. Only for such a
    tokenizer does a word split into pieces mean a word the base never saw; SD's CLIP tokenizer splits rare words
    into pieces it was trained on, legitimately."""
    if len(tokenizer) > WORD_LIST_MAX_TOKENS:
        return False
    return all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in ("circle", "background"))


def unknown_prompt_words(tokenizer, prompts) -> list[str]:
    """The words of ``prompts`` (in order, once each) that a word-list tokenizer has no token for; [] for any other
    tokenizer (see ``word_list_tokenizer``)."""
    prompts = [p for p in dict.fromkeys(prompts) if p]
    if not prompts or not word_list_tokenizer(tokenizer):
        return []
    return list(dict.fromkeys(w for p in prompts for w in unknown_words(tokenizer, p)))


def known_words(tokenizer, words) -> list[str]:
    """The words of ``words`` (in order, once each) that ``tokenizer`` reads as one whole-word token: for a base whose
    tokenizer was built from its training words, the words it can understand."""
    return [w for w in dict.fromkeys(words) if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
