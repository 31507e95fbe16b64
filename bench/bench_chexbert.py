"""CheXbert labeling speed at real size (BERT-base, 14 heads, random weights) on this CPU; prints figures only.

    python bench/bench_chexbert.py                          # batch sizes 1 8 16 32, torch's default threads
    python bench/bench_chexbert.py --batch-sizes 1 16 --threads 1 --repeat 2

The architecture is bert-base-uncased's (a config.json written to a temporary folder and read by
the production loader); the weights are random, which changes no timing. The reports are the 48
OpenI texts of ``../shared/fixtures/chexbert_tiny/expected.json`` (one of them longer than 512
word pieces, so cut as CheXbert cuts it), tokenized with that fixture's in-domain WordPiece
vocabulary padded to bert-base's 30,522 entries: the word-piece counts are printed, since they set
the cost. The figures are reports labelled per second of wall time and per CPU-second (the cost when other
processes share the cores), tokenization included, the model in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xraygpt_app.evaluation.chexbert import (
    CONDITIONS,
    CheXbertLabeler,
    encode_report,
    load_bert_config,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "chexbert_tiny"
BERT_BASE = {  # bert-base-uncased's config.json (architecture values)
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522,
}


def real_size_labeler(folder: Path) -> CheXbertLabeler:
    """bert-base config + the fixture's vocabulary padded to 30,522 tokens, through the production loaders."""
    (folder / "config.json").write_text(json.dumps(BERT_BASE), encoding="utf-8")
    vocab = (FIXTURE / "bert_base_uncased_tiny" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab += [f"[unused{i}]" for i in range(BERT_BASE["vocab_size"] - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    shapes = [(4, 768)] * (len(CONDITIONS) - 1) + [(2, 768)]  # CheXbert's heads: 13 of 4 classes, No Finding of 2
    return CheXbertLabeler(load_bert_config(folder), shapes, load_tokenizer(folder)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per batch size (the median is printed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    reports = expected["refs"] + expected["hyps"]
    with tempfile.TemporaryDirectory() as tmp:
        labeler = real_size_labeler(Path(tmp))
    params = sum(p.numel() for p in labeler.parameters())
    lengths = [len(encode_report(text, labeler.tokenizer)) for text in reports]
    print(f"CheXbert real size (BERT-base + 14 heads, {params / 1e6:.1f} M parameters, float32, random weights),"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(reports)} OpenI reports: word pieces per report median {statistics.median(lengths):.0f},"
          f" mean {statistics.mean(lengths):.0f}, max {max(lengths)} (the 512 cut)")
    labeler.label_classes(reports[:4], batch_size=4)  # warm-up
    for batch_size in args.batch_sizes:
        times, cpu = [], []
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            labeler.label_classes(reports, batch_size=batch_size)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        seconds, cpu_seconds = statistics.median(times), statistics.median(cpu)
        # CPU seconds (all threads) say what the work costs when other processes share the cores
        print(f"batch {batch_size:>3}: {len(reports) / seconds:6.2f} reports/s wall ({seconds:.1f} s for"
              f" {len(reports)}), {len(reports) / cpu_seconds:6.2f} reports per CPU-second, median of {args.repeat}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MiB")
    print(f"load average while measuring: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
