"""The packaged CLIP tokenizer asset gives exactly open_clip's ids (SD v1 padding with <|endoftext|>)."""

import importlib.util

import pytest
from transformers import CLIPTokenizer

from sd_ds.models import CLIP_TOKENIZER_DIR, tokenize

CAPTIONS = [
    "a red circle on a blue background",
    "A photo of an astronaut riding a horse on Mars, 4k, trending on artstation!!!",
    "Hello, World! 123 4567 3.14159 #hashtag @user",
    "café naïve résumé — “quotes” and ‘single’ «guillemets»",
    "東京タワーの夜景 and 北京 with emoji 🐱🚀",
    "UPPER lower MiXeD",
    "   leading and trailing spaces   ",
    "html &amp; entities &lt;b&gt;",
    "don't won't it's y'all",
    "word " * 120,  # longer than 77 tokens: truncated, still ends with <|endoftext|>
    "",
]


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


def test_asset_shape():
    tok = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_ids_match_open_clip(open_clip_tokenizer, caption):
    tok = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    ours = tokenize(tok, [caption], 77)[0].tolist()
    theirs = open_clip_tokenizer([caption], context_length=77)[0].tolist()
    n = next((i for i, t in enumerate(theirs) if t == 0), 77)  # open_clip pads with 0
    assert ours[:n] == theirs[:n]
    assert ours[0] == 49406 and ours[n - 1] == 49407
    assert all(t == 49407 for t in ours[n:]), "SD v1 pads with <|endoftext|>"
    assert len(ours) == 77
