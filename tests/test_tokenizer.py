"""The packaged CLIP tokenizer asset gives exactly open_clip's ids (SD v1 padding with <|endoftext|>)."""

import importlib.util
import subprocess
import sys

import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast

from sd_ds.models import CLIP_TOKENIZER_DIR, clean_caption, tokenize

CAPTIONS = [
    "a red circle on a blue background",
    "A photo of an astronaut riding a horse on Mars, 4k, trending on artstation!!!",
    "Hello, World! 123 4567 3.14159 #hashtag @user",
    "1920x1080 wallpaper, 50% off, $19.99 (incl. VAT) — 2nd edition, 3rd-party",
    "phone: +1 (555) 010-9999; e-mail: someone@example.com; url: https://example.com/a?b=c&d=e",
    "café naïve résumé — “quotes” and ‘single’ «guillemets»",
    "東京タワーの夜景 and 北京 with emoji 🐱🚀",
    "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी",
    "한국어 문장과 ไทย ภาษา",
    "emoji only 😀😃😄😁😆😅🤣😂🙂🙃",
    "UPPER lower MiXeD",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nin the caption",
    "html &amp; entities &lt;b&gt; &quot;quoted&quot; &#39;apos&#39;",
    "double-escaped &amp;amp; entity",
    "don't won't it's y'all I'M WE'LL they'd you've",
    "ellipsis... and!!! more??? and ---- dashes ___ underscores",
    "a painting of a fox, by Greg Rutkowski and Alphonse Mucha, oil on canvas, highly detailed, 8k",
    "brackets [x] {y} (z) <w> | pipes \\ backslash / slash ~ tilde ` backtick ^ caret",
    "mojibake: cafÃ© and Ã¼ber",
    "numbers 0 00 000 0000 00000 000000 1234567890 3.5e-7 -42",
    "a",
    "!",
    "    ",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "Zürich Straße Ærøskøbing Łódź İstanbul",
    "word " * 120,  # longer than 77 tokens: truncated, still ends with <|endoftext|>
    "a very long caption with many different words, " * 12,
    "",
]
# Not compared: a caption holding a literal "<|endoftext|>". transformers (like OpenAI's original CLIP
# tokenizer) reads it as the special token; open_clip, whose specials are named "<end_of_text>", spells it out.


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch not installed (tools/setup_env.sh --dev installs it)")
    # Load the module by path: `import open_clip` drags in torchvision.
    path = f"{list(spec.submodule_search_locations)[0]}/tokenizer.py"
    mspec = importlib.util.spec_from_file_location("open_clip_tokenizer_by_path", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module", params=[CLIPTokenizer, CLIPTokenizerFast], ids=lambda c: c.__name__)
def asset_tokenizer(request):
    return request.param.from_pretrained(CLIP_TOKENIZER_DIR)


def open_clip_ids(open_clip_tokenizer, caption: str) -> list[int]:
    """open_clip's ids with its 0-padding replaced by <|endoftext|>, as SD v1's tokenizer pads."""
    ids = open_clip_tokenizer([caption], context_length=77)[0].tolist()
    n = next((i for i, t in enumerate(ids) if t == 0), 77)
    return ids[:n] + [49407] * (77 - n)


def test_asset_shape(asset_tokenizer):
    tok = asset_tokenizer
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.convert_ids_to_tokens([0, 256, 320, 49406, 49407]) == ["!", "!</w>", "a</w>", "<|startoftext|>",
                                                                        "<|endoftext|>"]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_ids_match_open_clip(open_clip_tokenizer, asset_tokenizer, caption):
    ours = tokenize(asset_tokenizer, [caption], 77)[0].tolist()
    theirs = open_clip_ids(open_clip_tokenizer, caption)
    assert ours == theirs
    assert ours[0] == 49406 and 49407 in ours


def test_raw_tokenizer_matches_open_clip_on_clean_text(open_clip_tokenizer, asset_tokenizer):
    """Without our clean-up step the asset alone already gives CLIP's ids on text that needs no repair."""
    clean = [c for c in CAPTIONS if clean_caption(c) == c]
    assert len(clean) >= 15
    for caption in clean:
        ours = asset_tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours == open_clip_ids(open_clip_tokenizer, caption), caption


def test_truncation_keeps_75_content_tokens(asset_tokenizer):
    ids = tokenize(asset_tokenizer, ["word " * 120], 77)[0].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:76] == [2653] * 75  # "word</w>"


def test_build_script_reproduces_committed_asset(tmp_path):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open-clip-torch not installed")
    script = CLIP_TOKENIZER_DIR.parents[2] / "tools" / "build_clip_tokenizer.py"
    subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path)], check=True, capture_output=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (CLIP_TOKENIZER_DIR / name).read_bytes(), name
    assert "MIT" in (tmp_path / "PROVENANCE.md").read_text()


# --- captions far longer than the window (issue 30: a 5 MB caption cost 7 s of tokenizing per sample) ---

def _whole(tokenizer, caption: str) -> list[int]:
    """The ids of the whole caption, cleaned and tokenized as it is (what tokenize did before cutting)."""
    return tokenizer(clean_caption(caption), padding="max_length", max_length=77, truncation=True).input_ids


def _long_captions() -> dict[str, str]:
    import random

    rng = random.Random(0)
    words = ["a", "photo", "of", "the", "red", "dog", "&amp;", "café", "cafÃ©", "🐱🚀", "東京タワー", "3.14", "---",
             "Straße", "&quot;quoted&quot;", "https://example.com/a?b=c&d=e", "don't", "\n", "\t", "   "]
    sentence = "A photo of an astronaut riding a horse on Mars, 4k, trending on artstation! "
    return {
        # around the bound (64 x 77 = 4,928 non-space characters) and past it
        **{f"words_{n}": " ".join(rng.choice(words) for _ in range(n)) for n in (900, 1100, 1300, 5000)},
        "sentences_20k": sentence * 260,
        "newlines_10k": ("line of text\n" * 800),
        "one_word_10k": "x" * 10_000,
        "spaces_first": " " * 4000 + sentence * 100,
        "entities_spaced": "&amp;quot; " * 1200,
        "emoji_spaced": "😀 😃 😄 " * 3000,
        "every_caption_above": " ".join(CAPTIONS) * 6,
    }


@pytest.mark.parametrize("name", list(_long_captions()))
def test_cutting_long_captions_keeps_their_ids(asset_tokenizer, name):
    caption = _long_captions()[name]
    assert tokenize(asset_tokenizer, [caption], 77)[0].tolist() == _whole(asset_tokenizer, caption)


def test_normal_captions_are_not_cut():
    from sd_ds.models import cut_caption

    for caption in CAPTIONS:
        assert cut_caption(caption, 77) == caption
    assert cut_caption("word " * 1000, 77) == "word " * 1000  # 4,000 non-space characters: within the bound


def test_a_5_mb_caption_is_cut_before_tokenizing(asset_tokenizer):
    import random
    import time

    from sd_ds.models import cut_caption

    rng = random.Random(1)
    words = ["a", "photo", "of", "the", "red", "dog", "&amp;", "café", "🐱", "\n"]
    caption = " ".join(rng.choice(words) for _ in range(1_500_000))[:5_000_000]
    assert len(caption) == 5_000_000
    tokenize(asset_tokenizer, ["warm-up: ftfy and the tokenizer load lazily"], 77)
    started = time.perf_counter()
    ids = tokenize(asset_tokenizer, [caption], 77)[0].tolist()
    took = time.perf_counter() - started
    assert took < 1.0, f"{took:.2f} s for one 5 MB caption (7 s before it was cut; ~0.03 s here alone)"
    assert len(cut_caption(caption, 77)) < 10_000
    # The same ids as the whole caption, shown on a 200 kB prefix (the whole 5 MB takes ~20 s to tokenize).
    assert ids == _whole(asset_tokenizer, caption[:200_000])
    for pathological in ("x" * 5_000_000, " \n" * 2_500_000, "&amp;quot;" * 500_000):
        started = time.perf_counter()
        tokenize(asset_tokenizer, [pathological], 77)
        assert time.perf_counter() - started < 1.0
