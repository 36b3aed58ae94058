"""keras_hub presets made offline: a GPT-2 causal LM with a real byte-level BPE
tokenizer, saved with `save_to_preset` to a local directory laid out as a
downloaded preset is (`config.json`, `metadata.json`, `model.weights.h5`,
`task.json`, `tokenizer.json`, `preprocessor.json`, `assets/`).

The tokenizer is GPT-2's (`keras_hub.models.GPT2Tokenizer`): the 256-symbol
byte alphabet plus `merges` merges learnt here from Python's own source text
by the textbook BPE loop (count adjacent pairs inside words, merge the most
frequent, repeat). `vocabulary_size` above what the merges give pads the
vocabulary with tokens the tokenizer never produces, so the weights can have
GPT-2's real shapes (50,257 x hidden) without a download.

Used by `tests/test_models_preset.py`, `benchmarks/preset_load.py` and the
example's smoke test.
"""

from __future__ import annotations

import collections
import os
import re

END_OF_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer, in short: a word is an optional space and a run of
# letters, digits or other symbols.
_WORDS = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def byte_alphabet():
    """GPT-2's map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def source_text(limit_bytes=200_000):
    """Python's own standard-library source, the text every install ships."""
    stdlib = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= limit_bytes:
            break
    return "\n".join(chunks)[:limit_bytes]


def learn_bpe(text, merges):
    """(vocabulary dict, merge list) of a byte-level BPE learnt from `text`."""
    alphabet = byte_alphabet()
    words = collections.Counter(
        tuple(alphabet[b] for b in w.encode("utf-8")) for w in _WORDS.findall(text))
    vocabulary = {END_OF_TEXT: 0}
    for symbol in alphabet.values():
        vocabulary[symbol] = len(vocabulary)
    rules = []
    for _ in range(merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        rules.append(f"{a} {b}")
        vocabulary[a + b] = len(vocabulary)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return vocabulary, rules


def gpt2_tokenizer(merges=64, vocabulary_size=None, text_bytes=50_000):
    """A `GPT2Tokenizer` with `merges` merges learnt from the standard library."""
    import keras_hub

    vocabulary, rules = learn_bpe(source_text(text_bytes), merges)
    for i in range(len(vocabulary), vocabulary_size or 0):
        vocabulary[f"<unused{i}>"] = i
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=rules)


def make_gpt2_preset(directory, *, layers=2, heads=2, hidden=32, intermediate=64,
                     sequence_length=32, merges=64, vocabulary_size=None, seed=0):
    """Saves a random-initialized GPT-2 causal LM and its tokenizer as a preset.

    Returns the `GPT2CausalLM` (built without any strategy).
    """
    import keras
    import keras_hub

    tokenizer = gpt2_tokenizer(merges, vocabulary_size)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length)
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=layers, num_heads=heads,
        hidden_dim=hidden, intermediate_dim=intermediate, dropout=0.0,
        max_sequence_length=max(64, sequence_length))
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    model.save_to_preset(directory)
    return model
