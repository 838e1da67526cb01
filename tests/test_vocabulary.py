"""cnkit.models.vocabulary: a base's text encoder carried over to a wider vocabulary, and unknown words found."""

import pytest
import torch

from cnkit.colours import X11_WORDS
from cnkit.data.toyworld import VOCABULARY
from cnkit.models.tiny import TinySDConfig, _text_encoder
from cnkit.models.tokenizer import build_tokenizer
from cnkit.models.vocabulary import unknown_words, widen

OLD_WORDS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple", "circle", "square",
             "triangle", "with", "background", "on", "and", ",")


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A text encoder and tokenizer of the first base's kind: eight colour words."""
    tokenizer = build_tokenizer(OLD_WORDS, tmp_path_factory.mktemp("old"))
    torch.manual_seed(0)
    return _text_encoder(TinySDConfig(), tokenizer), tokenizer


def _states(encoder, tokenizer, prompt):
    ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


@pytest.mark.parametrize("colour_init, layers", [(False, 0), (True, 4)])
def test_the_widened_encoder_reads_old_prompts_as_before_and_every_colour_word_as_one_token(old, tmp_path,
                                                                                             colour_init, layers):
    encoder, tokenizer = old
    new, new_tokenizer, report = widen(encoder, tokenizer, VOCABULARY, tmp_path, colour_init=colour_init,
                                       text_layers=layers)
    prompt = "red circle with blue background"
    assert torch.equal(_states(encoder, tokenizer, prompt), _states(new, new_tokenizer, prompt))
    assert not unknown_words(new_tokenizer, "pale golden rod circle with old lace background")
    assert report["text_layers"] == (layers or 2) and new.config.num_hidden_layers == (layers or 2)
    assert report["colour_placed_words"] == (len(set(X11_WORDS) - set(OLD_WORDS)) if colour_init else 0)
    assert report["carried_rows"] + report["colour_placed_words"] + report["random_rows"] == len(new_tokenizer)


def test_a_colour_placed_word_sits_near_the_colours_it_names(old, tmp_path):
    encoder, tokenizer = old
    new, tok, _ = widen(encoder, tokenizer, VOCABULARY, tmp_path, colour_init=True)
    emb = new.get_input_embeddings().weight

    def row(word):
        return emb[tok(word, add_special_tokens=False).input_ids[0]]

    # crimson (220, 20, 60) is placed by the map fitted on the eight known words: nearer red than blue
    assert torch.dist(row("crimson"), row("red")) < torch.dist(row("crimson"), row("blue"))


def test_unknown_words_are_the_ones_the_tokenizer_splits(old):
    _, tokenizer = old
    assert unknown_words(tokenizer, "Pale golden rod circle with red background") == ["pale", "golden", "rod"]
    assert unknown_words(tokenizer, "red circle, blue square and green triangle on white background") == []
