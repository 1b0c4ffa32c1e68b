"""Writes bert-x-transformers-reference.safetensors: a tiny text encoder built by the original
`x-transformers` code, its token ids and its output, for tests/test_bert_reference.py.

Run by hand (not by the tests), with the release whose layout and numbers the LDM text2img-large
checkpoint has (CompVis vendored a copy of x-transformers 0.10 as ldm/modules/x_transformer.py):

    pip install x-transformers==0.10.2 entmax
    python tests/data/make_bert_reference.py

Any 0.8.4 - 0.17.10 release gives the same keys and numbers; from 0.17.11 on the absolute positional
embedding is scaled by dim ** -0.5, and from 0.20 the key layout differs.
"""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from x_transformers import Encoder, TransformerWrapper

OUT = Path(__file__).resolve().parent / "bert-x-transformers-reference.safetensors"
DIM, DEPTH, VOCAB, MAX_SEQ_LEN = 12, 2, 64, 77  # heads and dim_head stay at the defaults (8, 64), as in LDM


def main() -> None:
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=DEPTH), emb_dropout=0.1).eval()
    with torch.no_grad():  # noise on every parameter, so LayerNorm weights and biases matter too
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ids = torch.zeros(3, MAX_SEQ_LEN, dtype=torch.long)  # 0 is [PAD], 2 [CLS], 3 [SEP], as in BERT
    ids[0, :6] = torch.tensor([2, 17, 40, 9, 33, 3])
    ids[1] = torch.randint(4, VOCAB, (MAX_SEQ_LEN,))
    ids[2, :2] = torch.tensor([2, 3])
    with torch.no_grad():
        expected = model(ids, return_embeddings=True)
    tensors = {f"state_dict.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(input_ids=ids, expected=expected.contiguous())
    save_file(tensors, OUT, metadata={"x_transformers": version("x-transformers"), "torch": torch.__version__,
                                      "dims": f"dim={DIM} depth={DEPTH} vocab={VOCAB} max_seq_len={MAX_SEQ_LEN}",
                                      "script": "tests/data/make_bert_reference.py"})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
