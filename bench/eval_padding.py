"""How many token positions an evaluation pass computes, rows taken in order against rows batched
by length (:meth:`pyro_llm.data.EncodedDataset.by_length`, what every evaluation pass now does).

A batch is trimmed to its longest row, so the positions computed are ``sum over batches of
width x rows``; the count is exact (no timing) and a forward pass's cost is close to proportional
to it. Prints one line per task of the calibration study's configurations.

    python -m bench.eval_padding
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from pyro_llm.data import EncodedDataset, encode_examples, get_task, load_examples
from pyro_llm.models.loading import resolve_model_path

#: (task, test limit, max_length, split fractions) as in bench.study's cpu-* configurations
CASES = [("sst2", None, 96, (0.1, 0.3, 0.6)), ("boolq-cls", 500, 256, None), ("boolq", 500, 256, None),
         ("social-iqa", None, 128, None)]


def positions(data: EncodedDataset, batches: list) -> int:
    lengths = data.attention_mask.sum(1)
    return sum(int(lengths[b].max()) * len(b) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side, tok.truncation_side = "right", "left"
    print("| task | test rows | real tokens | positions, rows in order | positions, by length | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, limit, max_length, fractions in CASES:
        task = get_task(name)
        data = encode_examples(load_examples(task, "test", limit=limit, fractions=fractions), tok,
                               task.num_classes, max_length)
        in_order = positions(data, list(data.sequential(args.batch_size)))
        by_length = positions(data, data.by_length(args.batch_size))
        print(f"| {name} | {len(data)} | {int(data.attention_mask.sum())} | {in_order} | {by_length} | "
              f"{by_length / in_order:.3f} |")


if __name__ == "__main__":
    main()
