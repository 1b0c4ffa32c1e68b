"""Long prompts (ldm.prompts): chunks of 75 tokens with the web UIs' comma preference and BREAK, the negative prompt
padded to the same chunk count, a prompt of one chunk giving exactly the original's conditioning on the CLIP and the
BERT encoders, textual-inversion placeholders kept whole, and the inpainting core taking the encoder."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.errors import UserInputError
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.prompts import encode_prompt_pair
from ldm.prompts.chunking import BREAK, Token, split_into_chunks
from ldm.prompts.conditioning import prompt_chunks
from ldm.prompts.encoders import chunk_format
from tests.model_factory import random_tiny_model, tiny_config

COMMA = 267  # CLIP's ","
CAT = 2368  # CLIP's "cat"


def lengths(chunks):
    return [len(chunk) for chunk in chunks]


def words(n, token=1):
    return [Token(token)] * n


@pytest.fixture(scope="module")
def clip_model():
    return random_tiny_model(seed=1)


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", ",", "*"]) + "\n")
    config = tiny_config()
    config.model.params.cond_stage_config = OmegaConf.create({
        "target": "ldm.modules.encoders.modules.BERTEmbedder",
        "params": {"n_embed": 32, "n_layer": 1, "vocab_size": 10, "vocab_file": str(vocab)}})
    return random_tiny_model(seed=2, config=config)


def encode(model, prompts):
    with torch.no_grad():
        return model.get_learned_conditioning(list(prompts))


# --- chunking -----------------------------------------------------------------------------------------------------

def test_chunks_of_75_tokens():
    assert lengths(split_into_chunks(words(150))) == [75, 75]
    assert lengths(split_into_chunks(words(80))) == [75, 5]
    assert lengths(split_into_chunks(words(75))) == [75]
    assert lengths(split_into_chunks([])) == [0]


@pytest.mark.parametrize("comma_at, expected", [
    (55, [56, 24]),  # the comma's phrase (19 tokens after it) moves to the next chunk
    (60, [61, 19]),
    (54, [75, 5]),  # 21 tokens back: too far, the chunk is cut at 75
    (74, [75, 5]),  # the 75th token is the comma: nothing to move
    (75, [75, 5]),  # the comma is the 76th token: it starts the next chunk
])
def test_a_full_chunk_breaks_after_a_comma_within_its_last_20_tokens(comma_at, expected):
    tokens = words(80)
    tokens[comma_at] = Token(COMMA)
    chunks = split_into_chunks(tokens, comma_id=COMMA)
    assert lengths(chunks) == expected
    assert lengths(split_into_chunks(tokens, comma_id=COMMA, comma_backtrack=0)) == [75, 5]


def test_break_ends_the_chunk():
    a, b = Token(1), Token(2)
    assert split_into_chunks([a, BREAK, b]) == [[a], [b]]
    assert split_into_chunks([a, BREAK, BREAK, b]) == [[a], [], [b]]
    assert split_into_chunks([BREAK, a]) == [[], [a]]
    assert split_into_chunks([a, BREAK]) == [[a]]
    assert split_into_chunks(words(75) + [BREAK, b]) == [words(75), [b]]


def test_a_placeholder_of_several_vectors_is_not_split():
    star = Token(9, width=4)
    assert lengths(split_into_chunks(words(73) + [star])) == [73, 1]
    assert lengths(split_into_chunks(words(71) + [star])) == [72]
    with pytest.raises(UserInputError, match="76 vectors"):
        split_into_chunks([Token(9, width=76)])


def test_break_is_a_standalone_upper_case_word(clip_model):
    form = chunk_format(clip_model.cond_stage_model)
    assert lengths(prompt_chunks("a cat BREAK a cat", form, {})) == [2, 2]
    assert lengths(prompt_chunks("a cat BREAK", form, {})) == [2]
    assert len(prompt_chunks("a cat break a BREAKfast", form, {})) == 1
    assert lengths(prompt_chunks("(a cat) BREAK [a]", form, {}, weighting=True)) == [2, 1]


def test_a_prompt_of_one_chunk_has_the_tokenizers_ids(clip_model):
    form = chunk_format(clip_model.cond_stage_model)
    prompt = "a photograph of an astronaut riding a horse"
    assert form.ids(prompt_chunks(prompt, form, {})[0]) == clip_model.cond_stage_model.token_ids(prompt)[0]
    assert (form.start_id, form.end_id, form.pad_id, form.length, form.comma_id) == (49406, 49407, 49407, 77, COMMA)


def test_the_comma_preference_on_a_prompt(clip_model):
    form = chunk_format(clip_model.cond_stage_model)
    prompt = "cat " * 70 + ", red cat cat cat cat cat cat"  # the comma is token 71, 78 tokens in all
    assert lengths(prompt_chunks(prompt, form, {})) == [71, 7]
    assert lengths(prompt_chunks(prompt, form, {}, truncate=True)) == [75]


# --- encoding -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", [False, True])
def test_a_prompt_of_one_chunk_gives_the_original_conditioning(clip_model, weighting):
    prompts = ["a photograph of an astronaut riding a horse", "cat " * 75]
    c, uc = encode_prompt_pair(clip_model, prompts, ["", "ugly"], weighting=weighting)
    assert torch.equal(c, encode(clip_model, prompts))
    assert torch.equal(uc, encode(clip_model, ["", "ugly"]))
    assert encode_prompt_pair(clip_model, prompts, None)[1] is None


def test_a_long_prompt_is_encoded_chunk_by_chunk(clip_model):
    c, uc = encode_prompt_pair(clip_model, ["cat " * 100], [""])
    assert c.shape == uc.shape == (1, 154, 32)
    assert torch.equal(c[:, :77], encode(clip_model, ["cat " * 75]))
    assert torch.equal(c[:, 77:], encode(clip_model, ["cat " * 25]))
    assert torch.equal(uc, encode(clip_model, [""]).repeat(1, 2, 1))  # the negative prompt padded with empty chunks


def test_the_batch_and_the_negative_prompts_get_the_largest_chunk_count(clip_model):
    c, uc = encode_prompt_pair(clip_model, ["a red cat", "a cat"], ["", "cat " * 160])
    assert c.shape == uc.shape == (2, 231, 32)
    empty = encode(clip_model, [""])
    assert torch.equal(c[:, :77], encode(clip_model, ["a red cat", "a cat"]))
    assert torch.equal(c[:, 77:], empty.repeat(2, 2, 1))
    assert torch.equal(uc[0], empty.repeat(1, 3, 1)[0])
    assert torch.equal(uc[1, 154:], encode(clip_model, ["cat " * 10])[0])


def test_truncate_prompts_is_the_original_with_a_warning(clip_model, caplog):
    long = "cat " * 80 + "dog"
    with caplog.at_level("WARNING"):
        c, uc = encode_prompt_pair(clip_model, [long], [""], truncate=True)
        encode_prompt_pair(clip_model, [long], [""], truncate=True)
    assert torch.equal(c, encode(clip_model, [long])) and c.shape == (1, 77, 32)
    warnings = [r.getMessage() for r in caplog.records if "--truncate_prompts" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("is cut at 75 tokens; its last 6 tokens are ignored")
    weighted, _ = encode_prompt_pair(clip_model, [long], [""], weighting=True, truncate=True)
    assert torch.equal(weighted, c)


def test_bert_uses_its_own_tokens_and_limit(bert_model):
    form = chunk_format(bert_model.cond_stage_model)
    assert (form.start_id, form.end_id, form.pad_id, form.length, form.comma_id) == (2, 3, 0, 77, 8)
    c, uc = encode_prompt_pair(bert_model, ["a red cat", "cat " * 100], ["", "a"])
    assert c.shape == uc.shape == (2, 154, 32)
    assert torch.equal(c[:, :77], encode(bert_model, ["a red cat", "cat " * 75]))
    assert torch.equal(c[1:, 77:], encode(bert_model, ["cat " * 25]))
    assert torch.equal(uc[:, 77:], encode(bert_model, ["", ""]))
    short, _ = encode_prompt_pair(bert_model, ["a red cat , a cat"], None, weighting=True)
    assert torch.equal(short, encode(bert_model, ["a red cat , a cat"]))


def test_a_placeholder_of_several_vectors_moves_whole_to_the_next_chunk(clip_model):
    embedder = clip_model.cond_stage_model
    torch.manual_seed(0)
    clip_model.embedding_manager = EmbeddingManager(embedder, placeholder_strings=["*"], num_vectors_per_token=3)
    try:
        short = "a photo of *"
        c, _ = encode_prompt_pair(clip_model, [short], None)
        assert torch.equal(c, encode(clip_model, [short]))
        c, _ = encode_prompt_pair(clip_model, ["cat " * 73 + "*"], None)  # 73 + 3 vectors: * starts chunk 2
        assert c.shape == (1, 154, 32)
        assert torch.equal(c[:, :77], encode(clip_model, ["cat " * 73]))
        assert torch.equal(c[:, 77:], encode(clip_model, ["*"]))
        assert not torch.equal(c[:, 77:], encode(clip_model, [""]))
    finally:
        clip_model.embedding_manager = None


def test_inpainting_takes_the_prompt_encoder(clip_model):
    from ldm.models.diffusion.inpainting import inpaint
    from ldm.models.diffusion.registry import make_sampler

    image = torch.zeros(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    long = "a red cat, " * 20
    calls = []

    def encoder(prompts, negatives):
        calls.append((prompts, negatives))
        return encode_prompt_pair(clip_model, prompts, negatives)

    def run(**options):
        torch.manual_seed(0)
        return inpaint(clip_model, make_sampler("ddim", clip_model), image, mask, [long], 2, verbose=False,
                       **options)

    chunked, original = run(encode_prompts=encoder), run()
    assert calls == [([long], [""])]
    assert chunked.shape == original.shape and not torch.equal(chunked, original)


def test_a_clip_tokenizer_from_a_transformers_directory(tmp_path):
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    tokens = ["a", "c", "t", ",", "a</w>", "c</w>", "t</w>", ",</w>", "at</w>", "cat</w>", "<|startoftext|>",
              "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text("{" + ", ".join(f'"{t}": {i}' for i, t in enumerate(tokens)) + "}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na t</w>\nc at</w>\n")
    embedder = FrozenCLIPEmbedder(version=str(tmp_path), text_config={
        "vocab_size": len(tokens), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2})
    form = chunk_format(embedder)
    assert (form.start_id, form.end_id, form.pad_id, form.length, form.comma_id) == (10, 11, 11, 77, 7)
    prompt = "a cat, cat"
    ids = form.ids(prompt_chunks(prompt, form, {})[0])
    assert ids == embedder.token_ids(prompt)[0] and ids[:6] == [10, 4, 9, 7, 9, 11]
    with torch.no_grad():
        assert torch.equal(embedder(torch.tensor([ids])), embedder([prompt]))
