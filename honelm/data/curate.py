"""Curated TAPT: pick the k domain documents nearest to each task training text.

Gururangan et al. (2020, section 5) add, for every task sentence, its k nearest neighbours from
the domain corpus to the TAPT corpus (they embed with VAMPIRE and search with FAISS). honelm
offers two embeddings that need no extra dependency:

* `embedding` (default): the starting model's last hidden states, mean-pooled over real tokens
  and L2-normalised, so similarity is cosine. The model that will be adapted decides what
  "near" means, and nothing else has to be trained.
* `tfidf`: hand-written TF-IDF over lower-cased word tokens (sublinear tf 1 + log tf, smoothed
  idf log((1 + N) / (1 + df)) + 1, L2-normalised rows), cosine by a sparse (pool) x dense
  (query chunk) product. Hand-written because scikit-learn is not a dependency, and this is
  thirty lines; torch's CSR matmul keeps the pool sparse.

`nearest` is exact (no approximate index) and deterministic: a stable sort on the negated
similarity breaks ties by the smaller pool index.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from typing import Any, Sequence

import torch

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def tfidf_vectors(queries: Sequence[str], pool: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries (Q, V) dense, pool (N, V) sparse CSR), both L2-normalised, idf fitted on the pool.

    Query words absent from the pool carry no weight: they cannot make any pool document nearer.
    """
    pool_counts = [Counter(words(t)) for t in pool]
    df: Counter[str] = Counter()
    for c in pool_counts:
        df.update(c.keys())
    vocab = {w: i for i, w in enumerate(sorted(df))}
    n = len(pool)
    idf = torch.tensor([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(df)], dtype=torch.float32)

    def rows(counts: list[Counter[str]]) -> tuple[list[int], list[int], list[float]]:
        crow, col, val = [0], [], []
        for c in counts:
            items = sorted((vocab[w], 1.0 + math.log(k)) for w, k in c.items() if w in vocab)
            col.extend(i for i, _ in items)
            val.extend(v * float(idf[i]) for i, v in items)
            crow.append(len(col))
        return crow, col, val

    crow, col, val = rows(pool_counts)
    values = torch.tensor(val, dtype=torch.float32)
    norms = torch.zeros(n)
    row_of = torch.repeat_interleave(torch.arange(n), torch.tensor(crow[1:]) - torch.tensor(crow[:-1]))
    norms.index_add_(0, row_of, values * values)
    values = values / norms.sqrt().clamp_min(1e-12)[row_of]
    with warnings.catch_warnings():  # torch calls CSR "beta"; the CSR x dense product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        pool_m = torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col, dtype=torch.long), values,
                                         size=(n, len(vocab)), check_invariants=False)
    q = torch.zeros(len(queries), len(vocab))
    qc, qcol, qval = rows([Counter(words(t)) for t in queries])
    for i in range(len(queries)):
        q[i, qcol[qc[i]:qc[i + 1]]] = torch.tensor(qval[qc[i]:qc[i + 1]], dtype=torch.float32)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return q, pool_m


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128,
                batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H) L2-normalised mean of the trunk's last hidden states over real tokens, in fp32."""
    was_training = model.training
    model.eval()
    trunk = getattr(model, "base_model", model)
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        # the trunk alone: an LM head would compute (B, T, vocab) logits nobody reads
        hidden = trunk(**enc).last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    model.train(was_training)
    vectors = torch.cat(out) if out else torch.empty(0, 0)
    result = torch.empty_like(vectors)
    result[torch.tensor(order, dtype=torch.long)] = vectors  # back to input order
    return result


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (Q, k) and cosine similarities (Q, k) of the k nearest pool rows to each query.

    queries (Q, D) dense, pool (N, D) dense or sparse CSR, rows L2-normalised. Ties go to the
    smaller pool index (stable sort), so the result is a function of the inputs alone. The sort
    compares similarities rounded to 1e-6, so float noise (thread count, batch padding) cannot
    reorder candidates that are equal in all but the last bits.
    """
    k = min(k, pool.size(0))
    idx_out, sim_out = [], []
    for start in range(0, queries.size(0), chunk):
        q = queries[start:start + chunk]
        sims = (pool @ q.T).T if pool.is_sparse_csr else q @ pool.T  # (q, N)
        order = torch.sort(-torch.round(sims, decimals=6), dim=1, stable=True).indices[:, :k]
        idx_out.append(order)
        sim_out.append(torch.gather(sims, 1, order))
    if not idx_out:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat(idx_out), torch.cat(sim_out)
