"""Small word-level tokenizers for random test models and the offline trainer.

Real checkpoints ship their own tokenizer (``tokenizer.json``); the models this project builds from
configs need one too, and nothing can be downloaded, so we build a word-level ``tokenizers`` tokenizer
and wrap it in ``PreTrainedTokenizerFast``. The runtime later reads the very same ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

# Order fixes the ids: pad=0, bos=1, eos=2, unk=3, image=4 (the BLIP-2 image placeholder), dec=5.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "[DEC]")

BASE_WORDS = ["a", "photo", "of", "the", "an", "is", "are", "what", "color", "shape", "how", "many", "there", "on", "in", "left", "right", "top", "bottom", "question", "answer", ":", "?", ".", ",", "small", "large", "big", "red", "green", "blue", "yellow", "white", "black", "purple", "orange", "circle", "square", "triangle", "cat", "dog", "table", "car", "tree", "sky", "one", "two", "three", "four", "five", "and", "with"]


def build_word_tokenizer(words: Iterable[str] = (), *, add_bos: bool = True, add_eos: bool = False):
    """Return a ``PreTrainedTokenizerFast`` over ``BASE_WORDS`` + ``words`` (deduplicated, order kept).

    ``add_bos`` makes encoding prepend ``<s>`` (as the OPT tokenizer does); ``add_eos`` appends ``</s>``
    (as T5's does).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *BASE_WORDS, *words):
        tok = tok.strip().lower() if tok not in SPECIAL_TOKENS else tok
        if tok and tok not in vocab:
            vocab[tok] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = None
    from tokenizers import normalizers

    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    single = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
    special = [(t, vocab[t]) for t in ("<s>", "</s>") if t in single]
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        # a plain added special token: a *named* image_token is a str in transformers 5, which Blip2Processor
        # cannot use (it reads ``image_token.content``); unnamed, the processor takes this one as an AddedToken
        extra_special_tokens=["<image>"],
        padding_side="left",
    )
