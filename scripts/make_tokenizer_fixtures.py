#!/usr/bin/env python3
"""Build the CLIP tokenizer fixtures used by `crates/troupe-models/tests/tokenizer.rs`.

Run with the pinned reference environment:

    ~/.cache/troupe-pyref/bin/python scripts/make_tokenizer_fixtures.py

What it does:

1. Rebuilds SDXL's `tokenizer/` and `tokenizer_2/` folders from the CLIP BPE vocabulary that
   ships inside open_clip (`bpe_simple_vocab_16e6.txt.gz`), exactly the way
   openai/clip-vit-large-patch14's `vocab.json` / `merges.txt` were made. To keep the repository
   small, `vocab.json` and `merges.txt` are stored once, gzipped, in `tokenizer/`; the Rust test
   decompresses them into a scratch folder for both `tokenizer/` and `tokenizer_2/`.
   The two folders differ only in their config files: `tokenizer/` pads with `<|endoftext|>`
   (49407), `tokenizer_2/` pads with `!` (id 0), as in stabilityai/stable-diffusion-xl-base-1.0.
2. Tokenises a few hundred varied prompts with transformers' `CLIPTokenizer` and
   `CLIPTokenizerFast` the way diffusers' SDXL pipeline does
   (`padding="max_length", max_length=77, truncation=True`) and writes the expected ids to
   `expected.json`.

In transformers 5.x `CLIPTokenizerFast` is an alias of `CLIPTokenizer`, and `CLIPTokenizer` is
backed by the Rust `tokenizers` library (NFC -> `\\s+` -> " " -> lowercase; no ftfy). The script
still runs both names and records any disagreement. For information only, it also records what
open_clip's original `SimpleTokenizer` (ftfy + html unescape, the behaviour of transformers 4.x's
slow tokenizer when ftfy was installed) produces, with the folder's pad id; the Rust tokenizer
matches transformers 5.x, not this legacy path.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import sys
import tempfile

import open_clip
import transformers
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from transformers import CLIPTokenizer, CLIPTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "troupe-models", "tests", "fixtures", "clip_tokenizer")
MAX_LEN = 77

BPE_PATH = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for p in pairs:
        vocab.append("".join(p))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in pairs]


def added_token(content: str, normalized: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def configs(pad: str) -> tuple[dict, dict]:
    """`tokenizer_config.json` and `special_tokens_map.json` as in SDXL base 1.0."""
    decoder = {}
    if pad == "!":
        decoder["0"] = added_token("!", False)
    decoder["49406"] = added_token("<|startoftext|>", True)
    decoder["49407"] = added_token("<|endoftext|>", False)
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    def tok(content, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    stm = {
        "bos_token": tok("<|startoftext|>", True),
        "eos_token": tok("<|endoftext|>", False),
        "pad_token": tok(pad, False),
        "unk_token": tok("<|endoftext|>", False),
    }
    return cfg, stm


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def prompts() -> list[str]:
    p = [
        "",
        " ",
        "   \n\t  ",
        "a photo of a cat",
        "A Photo Of A CAT",
        "a photograph of an astronaut riding a horse",
        "a woman in a red dress, standing in the rain, cinematic lighting, 8k, highly detailed",
        "portrait of a man, (masterpiece:1.2), best quality, ((ultra detailed))",
        "a dog!!!",
        "hello! world!",
        "!",
        "!!",
        "!!!!!!!!!!",
        "wow!?!",
        "what?!",
        "a  b   c    d",
        "line one\nline two\n\nline three",
        "tabs\tbetween\t\twords",
        "\r\nwindows\r\nnewlines\r\n",
        "  leading and trailing spaces  ",
        "non\u00a0breaking\u00a0space",
        "ideographic\u3000space",
        "zero\u200bwidth\u200bspace",
        "em\u2003space and thin\u2009space",
        "caf\u00e9",
        "cafe\u0301 (decomposed)",
        "na\u00efve r\u00e9sum\u00e9 fa\u00e7ade",
        "\u00c9COLE \u00c0 PARIS",
        "Stra\u00dfe in M\u00fcnchen",
        "\u0130stanbul",
        "\u03a3\u03bf\u03c6\u03af\u03b1 \u039f\u0394\u03a5\u03a3\u03a3\u0395\u0399\u0391",
        "\u041c\u043e\u0441\u043a\u0432\u0430 \u0437\u0438\u043c\u043e\u0439",
        "\u6771\u4eac\u306e\u591c\u666f",
        "\u4e00\u53ea\u732b\u5750\u5728\u7a97\u53f0\u4e0a",
        "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
        "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
        "emoji \U0001f600\U0001f431\U0001f680",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",
        "flag \U0001f1ef\U0001f1f5 and \U0001f3f3\ufe0f\u200d\U0001f308",
        "thumbs up \U0001f44d\U0001f3fd",
        "\u2764\ufe0f love",
        "math \u2211 \u222b \u221e \u2248 \u2260",
        "arrows \u2192 \u2190 \u21d2",
        "fullwidth \uff21\uff22\uff23 \uff11\uff12\uff13",
        "ligature \ufb01nance \ufb02ower",
        "superscript x\u00b2 y\u00b3",
        "roman \u2168 \u216b",
        "circled \u2460 \u2461",
        "mojibake caf\u00c3\u00a9 and \u00e2\u20ac\u2122",
        "smart quotes \u201chello\u201d and \u2018world\u2019",
        "it\u2019s a dog\u2019s life",
        "it's a dog's life",
        "I'm, you're, we've, they'll, he'd, can't, won't",
        "I'M YOU'RE WE'VE THEY'LL HE'D CAN'T",
        "'s 't 're 've 'm 'll 'd",
        "rock 'n' roll",
        "\"quoted\" text",
        "html &amp; entities &lt;b&gt; &quot;x&quot; &#39;y&#39; &nbsp;",
        "&amp;amp;",
        "<b>bold</b> <i>italic</i>",
        "email: someone@example.com",
        "url https://example.com/path?a=1&b=2#frag",
        "C:\\Users\\name\\file.txt",
        "snake_case and kebab-case and camelCase",
        "numbers 0 1 2 3 42 1234567890",
        "3.14159 and 2,718 and 1e-10",
        "version 1.2.3-beta+build.4",
        "$100, \u20ac50, \u00a330, \u00a51000",
        "50% off!!!",
        "#hashtag @mention",
        "(parentheses) [brackets] {braces} <angles>",
        "...ellipsis\u2026",
        "--- dashes \u2013 en \u2014 em",
        "a,b;c:d.e",
        "~`^*_+=|\\/",
        "<|startoftext|>",
        "<|endoftext|>",
        "a cat <|endoftext|> a dog",
        "a cat<|startoftext|>a dog",
        "<|ENDOFTEXT|>",
        "< |endoftext| >",
        "</w>",
        "word</w>",
        "\u00bfqu\u00e9? \u00a1s\u00ed!",
        "control\u0007char and\u0000null",
        "replacement \ufffd char",
        "soft\u00adhyphen",
        "bom\ufeffinside",
        "combining a\u0308 o\u0308 u\u0308",
        "hangul jamo \u1100\u1161\u11a8",
        "vietnamese Ti\u1ebfng Vi\u1ec7t",
        "polish \u017c\u00f3\u0142\u0107",
        "\u01c5 titlecase digraph",
        "\u212b angstrom sign and \u2126 ohm sign",
        "K\u212a kelvin",
        "digits \u0663\u0664 \u096a\u096b \uff19",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "xqzjvkw qwxzj",
        "a" * 300,
        "ab " * 100,
        "1" * 100,
        "! " * 80,
        "\U0001f600" * 40,
        "\u732b" * 100,
    ]
    long_base = (
        "a highly detailed digital painting of a majestic castle on a cliff overlooking the sea at "
        "sunset, dramatic clouds, volumetric light, by greg rutkowski and alphonse mucha, trending "
        "on artstation, octane render, unreal engine, 8k resolution, intricate, elegant, sharp focus"
    )
    p.append(long_base)
    p.append(long_base + ", " + long_base)
    p.append(" ".join(["word"] * 74))
    p.append(" ".join(["word"] * 75))
    p.append(" ".join(["word"] * 76))
    p.append(" ".join(["word"] * 150))
    p.append(" ".join(str(i) for i in range(60)))

    # Deterministic random prompts mixing words, punctuation, unicode and whitespace.
    rng = random.Random(1234)
    words = (
        "a the photo of cat dog woman man portrait landscape city night neon cyberpunk forest river "
        "mountain castle dragon robot astronaut horse car street rain snow sunset beach ocean flower "
        "garden cinematic lighting detailed masterpiece painting oil watercolor sketch anime studio "
        "ghibli 4k 8k hdr bokeh depth field vintage film grain close-up wide-angle isometric low-poly "
        "don't it's we're they've I'll she'd caf\u00e9 na\u00efve \u00fcber \u00e9l\u00e8ve "
        "\u6771\u4eac \u732b \u041c\u043e\u0441\u043a\u0432\u0430 \u03b1\u03b2\u03b3 "
        "\U0001f600 \U0001f431 \u2764\ufe0f \U0001f680 &amp; &lt;3 <|endoftext|> ! !! ? ... , ; : "
        "( ) [ ] { } \" ' - _ / \\ # @ $ % ^ * + = ~ ` | 0 1 42 3.5 1999 100% x2 v1.5 "
        "ABC XYZ HeLLo WoRLD Stra\u00dfe \u0130 \ufb01 \uff21 \u2160"
    ).split(" ")
    seps = [" ", " ", " ", " ", "  ", "\n", "\t", ", ", ",", "", " \n ", "\u00a0", "\u3000"]
    for i in range(320):
        n = rng.choice([1, 2, 3, 5, 8, 12, 20, 40, 80])
        out = []
        for _ in range(n):
            out.append(rng.choice(words))
            out.append(rng.choice(seps))
        s = "".join(out)
        if i % 7 == 0:
            s = s.upper()
        if i % 11 == 0:
            s = "  " + s + "\n"
        p.append(s)
    # Deduplicate, keeping order.
    seen, uniq = set(), []
    for s in p:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def main() -> None:
    vocab, merges = build_vocab_and_merges()
    tok1 = os.path.join(OUT, "tokenizer")
    tok2 = os.path.join(OUT, "tokenizer_2")
    for d in (tok1, tok2):
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)

    vocab_bytes = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    merges_bytes = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    # mtime=0 keeps the gzip output byte-identical between runs.
    with open(os.path.join(tok1, "vocab.json.gz"), "wb") as f:
        f.write(gzip.compress(vocab_bytes, compresslevel=9, mtime=0))
    with open(os.path.join(tok1, "merges.txt.gz"), "wb") as f:
        f.write(gzip.compress(merges_bytes, compresslevel=9, mtime=0))
    for d, pad in ((tok1, "<|endoftext|>"), (tok2, "!")):
        cfg, stm = configs(pad)
        write_json(os.path.join(d, "tokenizer_config.json"), cfg)
        write_json(os.path.join(d, "special_tokens_map.json"), stm)
    with open(os.path.join(tok2, "README.md"), "w") as f:
        f.write(
            "`tokenizer_2/` shares `vocab.json` and `merges.txt` with `tokenizer/` (stored once,\n"
            "gzipped, in `../tokenizer/`); the test copies them next to these config files.\n"
            "Only the pad token differs: `!` (id 0) here, `<|endoftext|>` (49407) in `tokenizer/`.\n"
        )

    ps = prompts()
    legacy = SimpleTokenizer(context_length=MAX_LEN)
    cases = []
    n_slow_fast_diff = 0
    n_legacy_diff = {"tokenizer": 0, "tokenizer_2": 0}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, src in (("tokenizer", tok1), ("tokenizer_2", tok2)):
            d = os.path.join(tmp, name)
            os.makedirs(d)
            with open(os.path.join(d, "vocab.json"), "wb") as f:
                f.write(vocab_bytes)
            with open(os.path.join(d, "merges.txt"), "wb") as f:
                f.write(merges_bytes)
            for fn in ("tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(os.path.join(src, fn), d)
            folders[name] = d
        toks = {}
        for name, d in folders.items():
            slow = CLIPTokenizer.from_pretrained(d)
            fast = CLIPTokenizerFast.from_pretrained(d)
            toks[name] = (slow, fast)
            print(name, type(slow).__name__, type(fast).__name__, "pad", slow.pad_token, slow.pad_token_id,
                  "bos", slow.bos_token_id, "eos", slow.eos_token_id, "max", slow.model_max_length)

        for s in ps:
            case = {"prompt": s}
            for name, (slow, fast) in toks.items():
                kw = dict(padding="max_length", max_length=MAX_LEN, truncation=True)
                a = slow(s, **kw).input_ids
                b = fast(s, **kw).input_ids
                assert len(a) == MAX_LEN and len(b) == MAX_LEN
                case[name] = a
                if a != b:
                    n_slow_fast_diff += 1
                    case[name + "_fast"] = b
                leg = legacy([s])[0].tolist()
                pad_id = slow.pad_token_id
                # open_clip pads with 0 after EOS; substitute the folder's pad id.
                eos_at = leg.index(49407)
                leg = leg[: eos_at + 1] + [pad_id] * (MAX_LEN - eos_at - 1)
                if leg != a:
                    n_legacy_diff[name] += 1
                    case[name + "_legacy_ftfy"] = leg
            cases.append(case)

    fixture = {
        "generator": "scripts/make_tokenizer_fixtures.py",
        "transformers_version": transformers.__version__,
        "reference": "transformers.CLIPTokenizer(prompt, padding='max_length', max_length=77, truncation=True)",
        "notes": (
            "`tokenizer`/`tokenizer_2` hold the transformers CLIPTokenizer ids (what diffusers' "
            "StableDiffusionXLPipeline uses). `<name>_fast` appears only where CLIPTokenizerFast "
            "disagrees. `<name>_legacy_ftfy` appears only where open_clip's SimpleTokenizer "
            "(ftfy + html unescape; transformers 4.x slow path with ftfy) disagrees; informational."
        ),
        "cases": cases,
    }
    # One case per line keeps the file small and diffable.
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        head = {k: v for k, v in fixture.items() if k != "cases"}
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n]}\n")
    print(f"{len(cases)} prompts; slow/fast disagreements: {n_slow_fast_diff}; "
          f"legacy ftfy disagreements: {n_legacy_diff}")


if __name__ == "__main__":
    sys.exit(main())
