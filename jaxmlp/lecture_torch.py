"""The PyTorch lecture's batchnorm stage as the lecture runs it: one script, top to bottom.

    python -m jaxmlp.lecture_torch --steps STEPS --batch-size B [--threads 1] [--data names.txt]

Its data preparation (Python lists, `random.seed(42)`), its initialisation from
`torch.Generator().manual_seed(2147483647)`, its training loop (with the per-step
`lossi.append(loss.log10().item())` and the print every 10,000 steps) and its final
`split_loss` for train and val, written the way the lecture's notebook writes them. It is the
baseline `jaxmlp bench --e2e` times end to end in a fresh process against `jaxmlp train`; its
numbers are the lecture's (batchnorm, 200,000 steps: train 2.0674, val 2.1057).
"""

from __future__ import annotations

import argparse
import random
import sys
import time


def lecture_script(path: str, steps: int, batch_size: int, threads: int = 1,
                   log=print) -> dict:
    """Run the lecture's batchnorm stage; returns {"train", "val", "loop_seconds"}."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    with open(path) as f:
        words = f.read().splitlines()
    chars = sorted(set("".join(words)))
    stoi = {s: i + 1 for i, s in enumerate(chars)}
    stoi["."] = 0
    vocab_size, block_size = len(stoi), 3

    def build_dataset(words):
        X, Y = [], []
        for w in words:
            context = [0] * block_size
            for ch in w + ".":
                ix = stoi[ch]
                X.append(context)
                Y.append(ix)
                context = context[1:] + [ix]  # noqa: RUF005 (the lecture's line)
        return torch.tensor(X), torch.tensor(Y)

    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    Xtr, Ytr = build_dataset(words[:n1])
    Xdev, Ydev = build_dataset(words[n1:n2])

    n_embd, n_hidden = 10, 200
    g = torch.Generator().manual_seed(2147483647)
    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5 / 3) / (
        (n_embd * block_size) ** 0.5)
    W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.01
    b2 = torch.randn(vocab_size, generator=g) * 0
    bngain, bnbias = torch.ones((1, n_hidden)), torch.zeros((1, n_hidden))
    bnmean_running, bnstd_running = torch.zeros((1, n_hidden)), torch.ones((1, n_hidden))
    parameters = [C, W1, W2, b2, bngain, bnbias]
    for p in parameters:
        p.requires_grad = True

    lossi = []
    t0 = time.perf_counter()
    for i in range(steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        emb = C[Xb]
        embcat = emb.view(emb.shape[0], -1)
        hpreact = embcat @ W1
        bnmeani = hpreact.mean(0, keepdim=True)
        bnstdi = hpreact.std(0, keepdim=True)
        hpreact = bngain * (hpreact - bnmeani) / bnstdi + bnbias
        with torch.no_grad():
            bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
            bnstd_running = 0.999 * bnstd_running + 0.001 * bnstdi
        h = torch.tanh(hpreact)
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, Yb)
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < 100_000 else 0.01
        for p in parameters:
            p.data += -lr * p.grad
        if i % 10_000 == 0 and log is not None:
            log(f"{i:7d}/{steps:7d}: {loss.item():.4f}")
        lossi.append(loss.log10().item())
    loop_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def split_loss(x, y):
        emb = C[x]
        hpreact = emb.view(emb.shape[0], -1) @ W1
        hpreact = bngain * (hpreact - bnmean_running) / bnstd_running + bnbias
        return F.cross_entropy(torch.tanh(hpreact) @ W2 + b2, y).item()

    return {"train": split_loss(Xtr, Ytr), "val": split_loss(Xdev, Ydev),
            "loop_seconds": loop_seconds}


def main(argv: list[str] | None = None) -> int:
    from jaxmlp.data import DEFAULT_DATA

    p = argparse.ArgumentParser(prog="python -m jaxmlp.lecture_torch")
    p.add_argument("--steps", type=int, required=True, help="the lecture runs 200,000")
    p.add_argument("--batch-size", type=int, required=True, help="the lecture's is 32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    a = p.parse_args(argv)
    r = lecture_script(a.data, a.steps, a.batch_size, a.threads)
    print(f"train {r['train']:.4f}, val {r['val']:.4f}; loop {r['loop_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
