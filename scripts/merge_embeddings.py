#!/usr/bin/env python
"""Merge textual-inversion embedding files (Gal et al. 2022) into one, as the original script:

    python scripts/merge_embeddings.py --manager_ckpts a.pt b.pt --output_path merged.pt -sd

A placeholder already taken by an earlier file is a conflict. The original asked for a new string at
the terminal; here `--rename NEW ...` gives the new strings, in the order the conflicts occur, and
without it a conflict is refused. `-sd` tokenizes for Stable Diffusion's CLIP encoder, otherwise for
the LDM text2img-large BERT encoder (vocabulary: $LDM_BERT_VOCAB or the bert-base-uncased cache).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from ldm.errors import UserInputError
from ldm.modules.embedding_manager import PaddedIds, read_embedding_file, save_embedding_file, single_token


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Merge textual-inversion embedding files into one.")
    parser.add_argument("--manager_ckpts", type=str, nargs="+", required=True,
                        help="paths to the embedding files (embeddings.pt) to merge")
    parser.add_argument("--output_path", type=str, required=True, help="output path for the merged file")
    parser.add_argument("-sd", "--stable_diffusion", action="store_true",
                        help="the embeddings are for Stable Diffusion (CLIP tokenizer); default: LDM (BERT)")
    parser.add_argument("--rename", type=str, nargs="+", default=[], metavar="NEW",
                        help="new placeholder strings for conflicting placeholders, in the order they occur")
    return parser


def tokenizer(stable_diffusion: bool) -> tuple[PaddedIds, Optional[int]]:
    """Padded token ids of prompts for the chosen text encoder, and its unknown-token id."""
    if stable_diffusion:
        from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer(), None
    from ldm.modules.encoders.bert import BERTTokenizer

    bert = BERTTokenizer(vq_interface=False)
    return bert.token_ids, bert.unk_token_id


def merge(paths: Sequence[str], padded_ids: PaddedIds, unk_token_id: Optional[int],
          renames: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """(placeholder -> vectors, placeholder -> token, placeholder -> source file) of the merged files."""
    params: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    sources: dict[str, str] = {}
    pending = list(renames)
    for path in paths:
        for string, vectors in read_embedding_file(path).items():
            if string in params:
                if not pending:
                    raise UserInputError(f"placeholder {string!r} of {path} is already taken by {sources[string]}; "
                                         "pass --rename NEW (one new string per conflict)")
                new = pending.pop(0)
                if new in params:
                    raise UserInputError(f"--rename {new!r} is already a placeholder of {sources[new]}")
                string = new
            if params and vectors.shape[1] != next(iter(params.values())).shape[1]:
                raise UserInputError(f"{path} holds vectors of width {vectors.shape[1]}, the earlier files "
                                     f"{next(iter(params.values())).shape[1]}: they are for different text encoders")
            tokens[string] = single_token(padded_ids, string, unk_token_id)
            params[string] = vectors
            sources[string] = str(path)
    if pending:
        raise UserInputError(f"--rename gave {len(pending)} more string(s) than there are conflicts: {pending}")
    return params, tokens, sources


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = get_parser().parse_args(argv)
    try:
        padded_ids, unk_token_id = tokenizer(opt.stable_diffusion)
        params, tokens, sources = merge(opt.manager_ckpts, padded_ids, unk_token_id, opt.rename)
        save_embedding_file({"string_to_token": {s: torch.tensor(t) for s, t in tokens.items()},
                             "string_to_param": params}, opt.output_path)
    except UserInputError as error:
        print(f"merge_embeddings.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"merge_embeddings.py: error: cannot write {opt.output_path}: {error.strerror or error}", file=sys.stderr)
        return 2
    print("Managers merged. Final list of placeholders:")
    for string, source in sources.items():
        print(f"  {string}: {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
