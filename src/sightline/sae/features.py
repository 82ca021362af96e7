"""An SAE's latents over an ActivationStore, streamed: batches of whole examples, top activations, token ids.

Everything here reads the store shard by shard (`ActivationStore.iter_batches`, unshuffled), so
memory holds one batch of activations plus what the accumulators keep, whatever the store's size.
`TopActivations` keeps, per latent, its top images (by the latent's largest activation over the
image's tokens) and its top text tokens: [width, k] arrays.

The store does not keep token ids; `StoreTokens` recovers them by tokenising each example's stored
`text` (the exact text fed, image placeholder unexpanded) with the model's tokenizer and expanding
each image placeholder to the image's token count, checked against the stored layout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError
from sightline.models.layout import IMAGE, IMAGE_NEWLINE, MODALITIES, SPECIAL, TEXT  # noqa: F401 (re-exported)

IMAGE_CODES = (IMAGE, IMAGE_NEWLINE)  # codes into MODALITIES of the tokens an image occupies


@dataclass
class LatentBatch:
    """One batch of whole examples: inputs, reconstructions and latents, with the store's index rows."""

    x_nd: torch.Tensor  # float32, original units
    x_hat_nd: torch.Tensor
    f_nw: torch.Tensor  # latents (>= 0)
    index: np.ndarray  # structured rows: example, position, modality, image, view, row, col

    @property
    def modality(self) -> np.ndarray:
        return self.index["modality"]


def sae_device(sae) -> torch.device:
    """The device an SAE's weights are on."""
    return next(iter(sae.parameters())).device


def check_sae_store(sae, store, site: str | None = None) -> str:
    """The store site an SAE reads (its cfg.site unless given); UserError if the store lacks it or d differs."""
    site = site or getattr(sae.cfg, "site", None)
    if not site:
        raise UserError("the SAE's config names no site; pass the store site to analyse explicitly")
    if site not in store.site_shapes:
        raise UserError(f"SAE site {site} is not in store {store.path} (sites: {', '.join(store.sites)}); "
                        "extract that site, or pass the SAE trained on a stored site")
    d = store.site_shapes[site]
    if len(d) != 1 or d[0] != sae.W_dec.shape[1]:
        raise UserError(f"SAE d_in {sae.W_dec.shape[1]} does not match store site {site} of shape {list(d)}: "
                        "pass the SAE trained on this store's model and site")
    return site


def iter_example_batches(store, site: str, batch_size: int = 4096) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Stream (acts [n, d], index rows) in batches that never split an example (its tokens are contiguous
    in an unshuffled stream); an example longer than batch_size comes whole in one batch."""
    carry: tuple[torch.Tensor, np.ndarray] | None = None
    for b in store.iter_batches([site], batch_size=batch_size):
        x, idx = b[site], b["index"]
        if carry is not None:
            x, idx = torch.cat([carry[0], x]), np.concatenate([carry[1], idx])
            carry = None
        ex = idx["example"]
        cut = len(ex) - int(np.argmax(ex[::-1] != ex[-1])) if (ex != ex[-1]).any() else 0
        if cut < len(ex):
            carry = (x[cut:].clone(), idx[cut:].copy())
        if cut:
            yield x[:cut], idx[:cut]
    if carry is not None:
        yield carry


@torch.no_grad()
def iter_latents(sae, store, site: str | None = None, batch_size: int = 4096, progress: bool = False,
                 desc: str = "sae latents") -> Iterator[LatentBatch]:
    """Encode and reconstruct every stored token of the SAE's site, in batches of whole examples."""
    from tqdm.auto import tqdm

    site = check_sae_store(sae, store, site)
    dev = sae_device(sae)
    bar = tqdm(total=store.n_tokens, desc=desc, unit="tok", disable=not progress, dynamic_ncols=True)
    for x, idx in iter_example_batches(store, site, batch_size):
        x = x.to(device=dev, dtype=torch.float32)
        f = sae.encode(x)
        yield LatentBatch(x, sae.decode(f), f, idx)
        bar.update(len(idx))
    bar.close()


# ------------------------------------------------------------------------------------- token ids
def load_tokenizer(store, model: str | None = None, adapter=None):
    """The tokenizer of the store's model: the adapter's, else AutoTokenizer of `model` or of the folder
    the manifest names; None when none can be loaded (text contexts are then left out)."""
    if adapter is not None:
        return adapter.tokenizer
    import os

    name = model or ((store.manifest.get("model") or {}).get("name"))
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        if not os.path.isdir(os.path.expanduser(name)) and name.startswith((".", "/", "~")):
            return None
        return AutoTokenizer.from_pretrained(name, revision=(store.manifest.get("model") or {}).get("revision"))
    except (OSError, ValueError):
        return None


def _image_token_counts(example: dict, n_images: int, n_total: int) -> list[int]:
    """Image-token count per placeholder: the stored grids' tokens, any remainder (lead tokens) shared evenly."""
    grids = example.get("layout") or []
    counts = [sum(g["rows"] * (g["cols"] + int(g.get("newline", False))) for g in grids if g["image"] == i)
              for i in range(n_images)]
    rest = n_total - sum(counts)
    if n_images and rest and rest % n_images == 0:
        counts = [c + rest // n_images for c in counts]
    return counts


class StoreTokens:
    """Token ids of a store's examples, from their stored text (see the module docstring); LRU-cached."""

    def __init__(self, store, tokenizer, cache: int = 4096):
        self.store = store
        self.tok = tokenizer
        model = store.manifest.get("model") or {}
        self.image_token_id = model.get("image_token_id")
        if self.image_token_id is None:
            self.image_token_id = getattr(tokenizer, "image_token_id", None)
        self._by_id = {e["example"]: e for e in store.examples}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._size = cache
        self._special: bool | None = None  # add_special_tokens setting that reproduces the processor's ids

    def _expand(self, example: dict, special: bool) -> np.ndarray | None:
        ids = np.asarray(self.tok(example["text"], add_special_tokens=special)["input_ids"], dtype=np.int64)
        at = np.flatnonzero(ids == self.image_token_id)
        seq_len = int(example.get("seq_len", -1))
        counts = _image_token_counts(example, len(at), seq_len - (len(ids) - len(at)))
        parts, last = [], 0
        for p, c in zip(at, counts):
            parts += [ids[last:p], np.full(c, self.image_token_id, np.int64)]
            last = p + 1
        parts.append(ids[last:])
        out = np.concatenate(parts) if parts else ids
        if len(out) != seq_len:
            return None
        for g in example.get("layout") or []:  # the grids must start where the stored layout says
            if not 0 <= g["first_position"] < len(out) or out[g["first_position"]] != self.image_token_id:
                return None
        return out

    def ids(self, example_id: int) -> np.ndarray:
        """Token ids [seq_len] of one stored example, image placeholders expanded."""
        example_id = int(example_id)
        if example_id in self._cache:
            self._cache.move_to_end(example_id)
            return self._cache[example_id]
        ex = self._by_id[example_id]
        if "text" not in ex:
            raise UserError(f"store {self.store.path} keeps no text for example {example_id}; extract it again "
                            "with this sightline version to analyse text tokens")
        out = None
        for special in ([self._special] if self._special is not None else [True, False]):
            out = self._expand(ex, special)
            if out is not None:
                self._special = special
                break
        if out is None:
            raise UserError(f"the tokenizer does not reproduce example {example_id}'s {ex.get('seq_len')} tokens "
                            f"from its stored text; pass the --model the store {self.store.path} was extracted with")
        self._cache[example_id] = out
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return out

    def token_texts(self, ids: np.ndarray) -> list[str]:
        """Each id decoded alone (spaces kept)."""
        return [self.tok.decode([int(i)], clean_up_tokenization_spaces=False) for i in ids]

    def word_variants(self, word: str) -> list[np.ndarray]:
        """Token sequences that spell `word` in running text (bare, after a space, capitalised)."""
        seen, out = set(), []
        for w in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            ids = tuple(self.tok(w, add_special_tokens=False)["input_ids"])
            if ids and ids not in seen:
                seen.add(ids)
                out.append(np.asarray(ids, np.int64))
        return out


def word_positions(ids: np.ndarray, variants: list[np.ndarray]) -> np.ndarray:
    """Positions of the LAST token of every occurrence of any variant (token sequence) in ids."""
    hits: list[int] = []
    present = set(np.unique(ids).tolist())
    for v in variants:
        if len(v) == 0 or int(v[-1]) not in present:
            continue
        n = len(v)
        if n == 0 or n > len(ids):
            continue
        if n == 1:
            hits += np.flatnonzero(ids == v[0]).tolist()
            continue
        win = np.lib.stride_tricks.sliding_window_view(ids, n)
        hits += (np.flatnonzero((win == v).all(1)) + n - 1).tolist()
    return np.unique(np.asarray(hits, np.int64))


# ------------------------------------------------------------------------------ top activations
class TopActivations:
    """Per latent, the k images with its largest activation (max over the image's tokens) and the k
    text tokens with its largest activation. Bounded memory: [width, k] values and ids."""

    def __init__(self, width: int, k_images: int = 8, k_text: int = 8):
        self.width = width
        self.img_val = torch.full((width, k_images), -float("inf"))
        self.img_ex = torch.full((width, k_images), -1, dtype=torch.long)
        self.txt_val = torch.full((width, k_text), -float("inf"))
        self.txt_ex = torch.full((width, k_text), -1, dtype=torch.long)
        self.txt_pos = torch.full((width, k_text), -1, dtype=torch.long)

    @staticmethod
    def _merge(val, ids, new_val_mw, new_ids_m):
        """Keep the top k of (current [w, k], new candidates [m, w])."""
        k = val.shape[1]
        m = new_val_mw.shape[0]
        if m == 0:
            return val, ids
        kk = min(k, m)
        top_v, top_i = torch.topk(new_val_mw, kk, dim=0)  # [kk, w]
        cand_v = torch.cat([val, top_v.T.cpu()], 1)
        cand_ids = [torch.cat([a, b[top_i].T.cpu()], 1) for a, b in zip(ids, new_ids_m)]
        v, order = torch.topk(cand_v, k, dim=1)
        return v, [torch.gather(c, 1, order) for c in cand_ids]

    def update(self, batch: LatentBatch, image_max: tuple[torch.Tensor, np.ndarray] | None = None) -> None:
        """Add a batch of whole examples (image_max: its per-example max over image tokens, if computed)."""
        if image_max is None:
            image_max = per_example_max(batch.f_nw, batch.index, IMAGE_CODES)
        vals, ex = image_max
        if len(ex):
            self.img_val, (self.img_ex,) = self._merge(self.img_val, [self.img_ex], vals,
                                                       [torch.as_tensor(ex, dtype=torch.long, device=vals.device)])
        is_txt = batch.modality == TEXT
        if is_txt.any():
            rows = torch.as_tensor(np.flatnonzero(is_txt), device=batch.f_nw.device)
            f = batch.f_nw.index_select(0, rows)
            dev = f.device
            ex_t = torch.as_tensor(batch.index["example"][is_txt].astype(np.int64), device=dev)
            pos_t = torch.as_tensor(batch.index["position"][is_txt].astype(np.int64), device=dev)
            self.txt_val, (self.txt_ex, self.txt_pos) = self._merge(self.txt_val, [self.txt_ex, self.txt_pos], f,
                                                                    [ex_t, pos_t])

    def images(self, latent: int) -> list[tuple[int, float]]:
        """(example id, max activation) of the latent's top images, positive activations only."""
        return [(int(e), float(v)) for v, e in zip(self.img_val[latent], self.img_ex[latent]) if v > 0 and e >= 0]

    def texts(self, latent: int) -> list[tuple[int, int, float]]:
        """(example id, position, activation) of the latent's top text tokens, positive activations only."""
        return [(int(e), int(p), float(v)) for v, e, p in zip(self.txt_val[latent], self.txt_ex[latent],
                                                             self.txt_pos[latent]) if v > 0 and e >= 0]


def per_example_max(f_nw: torch.Tensor, index: np.ndarray, codes=IMAGE_CODES) -> tuple[torch.Tensor, np.ndarray]:
    """Per example of the batch, each latent's max over the example's tokens of the given modalities:
    ([m, w], example ids [m]); examples without such tokens are left out."""
    keep = np.isin(index["modality"], codes)
    if not keep.any():
        return f_nw.new_zeros((0, f_nw.shape[1])), np.zeros(0, np.int64)
    ex = index["example"][keep]
    uniq, inv = np.unique(ex, return_inverse=True)
    rows = torch.as_tensor(np.flatnonzero(keep), device=f_nw.device)
    f = f_nw.index_select(0, rows)
    out = f.new_zeros((len(uniq), f.shape[1]))  # latents are >= 0, so 0 is the identity of max
    inv_t = torch.as_tensor(inv, device=f.device).unsqueeze(1).expand_as(f)
    out.scatter_reduce_(0, inv_t, f, reduce="amax", include_self=True)
    return out, uniq.astype(np.int64)


# --------------------------------------------------------------------------------- views of one
@torch.no_grad()
def example_latents(sae, store, example_id: int, latents: list[int], site: str | None = None) -> dict[str, Any]:
    """One example's activations of chosen latents at every stored token: {'acts' [n, len(latents)], 'index'}."""
    site = check_sae_store(sae, store, site)
    ex = store.example(example_id, [site])
    f = sae.encode(ex[site].to(device=sae_device(sae), dtype=torch.float32))
    return {"acts": f[:, latents].cpu().numpy(), "index": ex["index"]}


def latent_heatmap(example: dict, acts_n: np.ndarray, index: np.ndarray, image: int = 0,
                   view: int | None = None) -> tuple[np.ndarray, int] | None:
    """Paint one latent's activations at an example's image tokens onto the original image: ([H, W], view).

    view None: the view holding the token of largest activation. None when the example has no such grid."""
    from sightline.models.layout import StoredLayout, tokens_to_pixels

    lay = StoredLayout(example.get("layout") or [])
    on = (index["image"] == image) & (index["modality"] == IMAGE) & (index["row"] >= 0) & (index["col"] >= 0)
    if not on.any():
        return None
    if view is None:
        k = np.flatnonzero(on)[int(np.argmax(acts_n[on]))]
        view = int(index["view"][k])
    try:
        g = lay.grid(image, view)
    except KeyError:
        return None
    sel = on & (index["view"] == view)
    scores = np.full((g.rows, g.cols), np.nan, np.float32)
    scores[index["row"][sel], index["col"][sel]] = acts_n[sel]
    return tokens_to_pixels(lay, scores, image, view), view
