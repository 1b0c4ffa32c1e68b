import json
import subprocess
import sys

import pytest

from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from tests.model_factory import DATA_DIR, REPO_DIR

CASES = json.loads((DATA_DIR / "clip-vit-l14-tokens.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:20] or "empty" for c in CASES])
def test_ids_match_the_original_clip_tokenizer(tokenizer, case):
    assert tokenizer.encode(case["prompt"], max_length=None) == case["ids"]


def test_padding_to_77_with_the_end_token(tokenizer):
    ids = tokenizer.encode("a photo of *")
    assert len(ids) == 77
    assert ids[:6] == [49406, 320, 1125, 539, 265, 49407]
    assert set(ids[6:]) == {49407}


def test_truncation_keeps_the_end_token_last(tokenizer):
    ids = tokenizer.encode("cat " * 200)
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:76] == [tokenizer.encode("cat", None)[1]] * 75


def test_round_trip_decode(tokenizer):
    assert tokenizer.decode(tokenizer.encode("a red circle on a blue background")) == "a red circle on a blue background"


def test_frozen_clip_embedder_tokenizes_offline():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    embedder = FrozenCLIPEmbedder(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2})
    tokens = embedder.tokenize(["a photograph of an astronaut riding a horse", ""])
    assert tokens.shape == (2, 77)
    assert tokens[0, :10].tolist() == CASES[0]["ids"]
    assert embedder(["a", "b"]).shape == (2, 77, 32)


def test_the_merge_table_is_read_on_first_use_and_once_per_process(monkeypatch):
    from ldm.modules.encoders import clip_tokenizer

    clip_tokenizer._simple_tokenizer.cache_clear()
    module = clip_tokenizer._open_clip_tokenizer_module()
    reads = []
    monkeypatch.setattr(module, "SimpleTokenizer", lambda path, _real=module.SimpleTokenizer: reads.append(path)
                        or _real(path))
    first, second = clip_tokenizer.CLIPTokenizer(), clip_tokenizer.CLIPTokenizer()
    assert reads == []
    assert first.encode("a red circle", 5) == second.encode("a red circle", 5) == [49406, 320, 736, 7117, 49407]
    assert len(reads) == 1
    clip_tokenizer._simple_tokenizer.cache_clear()


def test_the_work_is_done_by_open_clips_simple_tokenizer_without_importing_open_clip(tokenizer):
    code = ("import sys; from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer; t = CLIPTokenizer(); "
            "t.encode('a'); print(type(t.bpe).__name__, 'open_clip' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_DIR)
    assert out.stdout.split() == ["SimpleTokenizer", "False", "False"]


@pytest.mark.parametrize("prompt, ids", [
    # OpenAI's CLIP and transformers' CLIPTokenizer (Stable Diffusion's) read these as the special tokens ...
    ("a <|endoftext|> b", [320, 49407, 321]),
    ("<|startoftext|>a", [49406, 320]),
    # ... and open_clip's own names as plain text (open_clip alone would give 49406 and 49407 here).
    ("<start_of_text> x", [283, 1572, 318, 539, 318, 4160, 285, 343]),
    ("x <end_of_text>", [343, 283, 806, 318, 539, 318, 4160, 285]),
])
def test_special_token_strings_as_in_openai_clip(tokenizer, prompt, ids):
    assert tokenizer.tokenize(prompt) == ids


def test_a_file_that_is_not_the_merge_table_is_refused(tmp_path):
    import gzip

    from ldm.errors import UserInputError
    from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer

    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("#version\nh e\n")
    with pytest.raises(UserInputError, match="not CLIP's merge table"):
        CLIPTokenizer(path).encode("hello")
