"""SAE training throughput: sightline's trainer against EleutherAI's sparsify, same TopK shape, same CPU, one run.

    python benchmarks/sae_throughput.py                       # organism resid.2 image tokens (synthetic if no organism)
    python benchmarks/sae_throughput.py --store runs/acts --site resid.12 --holdout runs/acts-val

Both train a TopK SAE of the same shape (d from the data, --width latents, --k, --batch tokens per
step) for --steps steps on the same training tokens, then are scored by FVU on the same held-out
tokens. Each round runs (a) `sightline.sae.train_saes` (its defaults: Adam at SAE.default_lr,
streaming from the ActivationStore on disk with the prefetch thread, live metrics) and (b)
sparsify's `SparseCoder` driven by the inner loop of `sparsify.Trainer.fit` for loss_fn="fvu" (its
defaults: signum + schedule-free, lr 5e-3/sqrt(width/2^14), unit-norm decoder, b_dec = first batch
mean), fed from tokens already in memory (sparsify's trainer captures them from the LM; its data
path is not measured). AuxK is off in both (sparsify's default auxk_alpha=0); --auxk turns it on
in both (weight 1/32, the same dead threshold of steps*batch/10 tokens).
Tokens/s counts the training loop only (for (a) the loop including data loading, from its
summary.json). The rounds alternate (a) and (b); the median ratio is reported.

sparsify (PyPI `eai-sparsify`) is imported if installed, else from --sparsify-site (a venv's
site-packages, e.g. /work/venv-sparsify/lib/python3.11/site-packages, appended to sys.path after
this environment's packages, so torch/numpy come from here). Without it, (b) is a plain reference
TopK loop (dense autograd, Adam), and the output says so.
The last output line is `throughput_ratio=<ours/theirs> fvu_ours=<x> fvu_theirs=<y>`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def organism_stores(root: Path, n_train: int, n_test: int) -> tuple[Path, Path, str]:
    from sightline.data.synthetic import export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path

    ckpt = checkpoint_path()
    out = []
    for name, seed, n in (("train", 21, n_train), ("test", 22, n_test)):
        manifest = export_jsonl(root / f"data-{name}", seed=seed, n=n, per_image=1, facts=False)
        out.append(extract(ExtractConfig(model=str(ckpt), data=str(manifest), out=str(root / name), sites="resid.2",
                                         positions="image", dtype="float16", batch_size=16, progress=False)))
    return out[0], out[1], "resid.2"


def synthetic_stores(root: Path, d: int, n_tokens: int) -> tuple[Path, Path, str]:
    """Tokens that are 3-sparse combinations of 8d unit atoms plus noise (written as fp16 stores)."""
    from sightline.store import StoreWriter

    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(8 * d, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    out = []
    for name, n in (("train", n_tokens), ("test", max(2048, n_tokens // 8))):
        per = 64
        n_ex = n // per
        with StoreWriter(root / name, {"n_examples": n_ex}, {"resid.0": (d,)}, dtype="float16") as w:
            for i in range(n_ex):
                pick = torch.rand(per, 8 * d, generator=g).argsort(1)[:, :3]
                x = (torch.rand(per, 3, 1, generator=g) * 3 * atoms[pick]).sum(1)
                x += 0.05 * torch.randn(per, d, generator=g)
                idx = np.full((per, 7), -1, np.int32)
                idx[:, 0], idx[:, 1], idx[:, 2] = i, np.arange(per), 1
                w.add(i, {}, idx, {"resid.0": x})
        out.append(root / name)
    return out[0], out[1], "resid.0"


def load_sparsify(site_dir: str | None):
    try:
        import sparsify  # noqa: F401
    except ImportError:
        if site_dir and Path(site_dir).is_dir():
            sys.path.append(site_dir)  # after our own packages: torch and numpy stay ours
            try:
                import sparsify  # noqa: F401
            except ImportError as e:
                return None, f"sparsify not importable from {site_dir}: {e}"
        else:
            return None, "sparsify is not installed and no --sparsify-site given"
    import sparsify

    return sparsify, f"sparsify {sparsify.__version__} from {Path(sparsify.__file__).parent}"


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def run_ours(store: Path, site: str, out: Path, args, steps: int, x_test: torch.Tensor) -> tuple[float, float, dict]:
    from sightline.sae import SAE, SAEConfig, SAETrainConfig, train_saes

    cfg = SAETrainConfig(store=str(store), site=site, out=str(out), batch_size=args.batch,
                         total_tokens=steps * args.batch, log_every=max(1, steps // 4), checkpoint_every=10**9,
                         dead_tokens=steps * args.batch // 10,
                         saes=(SAEConfig(arch="topk", width=args.width, k=args.k,
                                         aux_coeff=1 / 32 if args.auxk else 0.0),))
    (path,) = train_saes(cfg, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    sae = SAE.from_pretrained(path)
    with torch.no_grad():
        score = fvu(sae(x_test)[0], x_test)
    return summary["tokens_per_s_this_session"], score, summary


def run_sparsify(sparsify, x_train: torch.Tensor, args, steps: int, x_test: torch.Tensor,
                 seed: int) -> tuple[float, float]:
    """The per-step work of sparsify.Trainer.fit (loss_fn="fvu", default optimizer) on in-memory tokens."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(seed)
    d = x_train.shape[1]
    sae = SparseCoder(d, SparseCoderConfig(num_latents=args.width, k=args.k), "cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / math.sqrt(args.width / 2**14))]),
                              momentum=0.95)
    opt.train()
    did_fire = torch.zeros(args.width, dtype=torch.bool)
    since_fired = torch.zeros(args.width, dtype=torch.long)
    auxk_alpha, dead_threshold = (1 / 32 if args.auxk else 0.0), steps * args.batch // 10
    g = torch.Generator().manual_seed(seed)
    n = len(x_train)
    order = torch.randperm(n, generator=g)
    pos = 0
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        x = x_train.index_select(0, order[pos : pos + args.batch])
        pos += args.batch
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        dead_mask = since_fired > dead_threshold if auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += args.batch
        since_fired[did_fire] = 0
        did_fire.zero_()
    seconds = time.perf_counter() - t0
    opt.eval()  # schedule-free: evaluate the averaged weights, as sparsify's checkpoints do
    with torch.no_grad():
        score = fvu(sae(x_test).sae_out, x_test)
    return steps * args.batch / seconds, score


def run_reference(x_train: torch.Tensor, args, steps: int, x_test: torch.Tensor, seed: int) -> tuple[float, float]:
    """A plain TopK SAE loop: dense autograd through topk, Adam lr 2e-4/sqrt(w/2^14), unit-norm decoder."""
    g = torch.Generator().manual_seed(seed)
    d, w = x_train.shape[1], args.width
    W_dec = torch.randn(w, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec.requires_grad_()
    W_enc = W_dec.detach().t().clone().requires_grad_()
    b_enc = torch.zeros(w, requires_grad=True)
    b_dec = x_train[:4096].mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=2e-4 / math.sqrt(w / 2**14))
    n = len(x_train)

    def fwd(x):
        pre = (x - b_dec) @ W_enc + b_enc
        v, i = pre.topk(args.k, dim=1)
        return torch.zeros_like(pre).scatter(1, i, v.relu()) @ W_dec + b_dec

    t0 = time.perf_counter()
    for _ in range(steps):
        x = x_train.index_select(0, torch.randint(0, n, (args.batch,), generator=g))
        loss = (fwd(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        return steps * args.batch / seconds, fvu(fwd(x_test), x_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="training store (default: organism resid.2 image tokens)")
    ap.add_argument("--holdout", default=None, help="held-out store for FVU (default: with --store, the same store)")
    ap.add_argument("--site", default="resid.2")
    ap.add_argument("--synthetic", action="store_true", help="synthetic sparse tokens instead of the organism")
    ap.add_argument("--d", type=int, default=128, help="width of synthetic tokens")
    ap.add_argument("--scenes", type=int, default=400, help="organism: training scenes (64 image tokens each)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--auxk", action="store_true", help="AuxK (weight 1/32) in both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1: the conservative figure)")
    ap.add_argument("--sparsify-site", default=None, help="site-packages of a venv holding sparsify (if not installed here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sightline.store import ActivationStore

    tmp = Path(tempfile.mkdtemp(prefix="sae-bench-"))
    if args.store:
        train, test, site = Path(args.store), Path(args.holdout or args.store), args.site
        data = f"store {train}"
    else:
        from sightline.organism import CHECKPOINT

        if args.synthetic or not (CHECKPOINT / "config.json").exists():
            train, test, site = synthetic_stores(tmp, args.d, args.scenes * 64)
            data = f"synthetic 3-sparse tokens, d={args.d}"
        else:
            t0 = time.perf_counter()
            train, test, site = organism_stores(tmp, args.scenes, max(50, args.scenes // 5))
            seconds = time.perf_counter() - t0
            data = f"organism {site} image tokens of {args.scenes} scenes (extracted in {seconds:.0f} s)"
    tr, te = ActivationStore.open(train), ActivationStore.open(test)
    img = lambda s: np.isin(s.index["modality"], [1, 2])  # noqa: E731
    x_train = tr.tensor(site).float()[img(tr)]
    x_test = te.tensor(site).float()[img(te)]
    sparsify, how = load_sparsify(args.sparsify_site)
    print(f"data: {data}; train tokens {len(x_train)}, held-out tokens {len(x_test)}, d={x_train.shape[1]}")
    print(f"config: TopK width={args.width} k={args.k} batch={args.batch} steps={args.steps} auxk={args.auxk} "
          f"threads={args.threads} torch {torch.__version__}")
    print(f"baseline: {how}" + ("" if sparsify else "; using a plain reference TopK loop instead"))

    ratios, ours_tps, theirs_tps, f_ours, f_theirs, fracs = [], [], [], [], [], []
    for r in range(args.rounds):
        tps_a, fvu_a, summary = run_ours(train, site, tmp / f"ours-{r}", args, args.steps, x_test)
        if sparsify is not None:
            tps_b, fvu_b = run_sparsify(sparsify, x_train, args, args.steps, x_test, seed=r)
        else:
            tps_b, fvu_b = run_reference(x_train, args, args.steps, x_test, seed=r)
        ratios.append(tps_a / tps_b)
        ours_tps.append(tps_a)
        theirs_tps.append(tps_b)
        f_ours.append(fvu_a)
        f_theirs.append(fvu_b)
        fracs.append((summary["load_frac"], summary["wait_frac"]))
        print(f"round {r}: ours {tps_a:,.0f} tok/s fvu {fvu_a:.4f} (loading {summary['load_frac']:.1%} of the loop "
              f"on its thread, waited {summary['wait_frac']:.1%}) | {'sparsify' if sparsify else 'reference'} "
              f"{tps_b:,.0f} tok/s fvu {fvu_b:.4f} | ratio {tps_a / tps_b:.2f}")
    print(f"median: ours {statistics.median(ours_tps):,.0f} tok/s, theirs {statistics.median(theirs_tps):,.0f} tok/s")
    print(f"throughput_ratio={statistics.median(ratios):.3f} fvu_ours={statistics.median(f_ours):.4f} "
          f"fvu_theirs={statistics.median(f_theirs):.4f}")


if __name__ == "__main__":
    main()
