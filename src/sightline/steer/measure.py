"""What a steering edit does: efficacy (forced choice), flips of the free answer, and damage.

- Efficacy: one forward of the efficacy prompt with the edit in the prefill; at the first answer
  position (the logits of the last prompt token), `prob` = softmax probability of the target
  word's first token (the paper's measure) and `share` = p(target) / (p(source) + p(target)) over
  the two words' first tokens. A word's first token is the first token that the prompt followed by
  the word adds to the prompt alone, i.e. exactly what the model would emit first.
- Flip: the free answer to the open prompt mentions the target word and not the source word
  (whole words, case-insensitive, a plural s/es allowed); `kept` mentions the source and not the target.
- Damage: accuracy on unrelated questions about the same image (an answer is right when it
  mentions the expected answer), and the increase in caption NLL: the mean negative
  log-likelihood per caption token, teacher-forced after the caption prompt with the edit applied
  (prefill positions; with mode="every_step" the caption tokens too), minus the same without edit.
- Judged swap (Line of Sight's four-way judgement, made by the model itself): each free answer is put
  to the UNSTEERED model under a fixed prompt (`JUDGE_PROMPT`; on the synthetic world `WORLD_JUDGE_PROMPT`)
  beside a blank grey image of the same size, so that only the text can decide, with four options:
  the source class, the target class and two distractor classes drawn from the other classes
  (`judge_options`: seeded, the order shuffled per item, so no class owns a position). The choice is
  the option whose first answer token has the highest next-token probability: over the letters A-D
  when the prompt lists the options ({options}), else over the class words themselves (the organism
  cannot read a listed choice; it names a shape after its question). An empty answer is judged as
  none of them. Rates count over every answer.
- Coherence: the mean NLL per token of the free answer as the answer to its own prompt about the
  clean image under the unsteered model, teacher-forced (`caption_nlls` with no edit); lower is more
  fluent. A swapped class word costs nats here by design; `coherence_other` leaves the class words'
  tokens out.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from sightline.steer.generate import left_pad, steer_edit, steer_positions


def mentions(text: str, word: str) -> bool:
    """Whether `text` contains `word` as a whole word (case-insensitive; a plural s/es allowed)."""
    w = re.escape(word.strip().lower())
    return re.search(rf"(?<![\w-]){w}(?:s|es)?(?![\w-])", text.lower()) is not None


def first_answer_token(adapter, prompt: str, word: str) -> int:
    """Id of the first token the model emits when answering the (rendered) `prompt` with `word`."""
    ids = caption_token_ids(adapter, prompt, word)
    if not ids:
        raise ValueError(f"the word {word!r} adds no token to the prompt")
    return ids[0]


def _rows(n_images: int, scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(image index, k) of every row of a sweep: images x scales, image-major."""
    img = np.repeat(np.arange(n_images), len(scales))
    k = np.tile(np.asarray(scales, dtype=np.float64), n_images)
    return img, k


@torch.no_grad()
def answer_logprobs(adapter, images, prompts: Sequence[str], token_ids: Sequence[int], site: str | None = None,
                    vector: torch.Tensor | None = None, scales: float | Sequence[float] = 0.0,
                    positions="image", mode: str = "prefill", batch_size: int = 16) -> np.ndarray:
    """[n, len(token_ids)] log-softmax at the first answer position of each (image, prompt[, k]) row."""
    from sightline.capture.edit import apply_edits

    n = len(images)
    scales_n = np.broadcast_to(np.asarray(scales, dtype=np.float64), (n,))
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    out = []
    for k in range(0, n, batch_size):
        sl = slice(k, k + batch_size)
        texts = [adapter.render_prompt(p) for p in prompts[sl]]
        inputs, pads, batch = left_pad(adapter, list(images[sl]), texts)
        inputs = {kk: v.to(adapter.device) if torch.is_tensor(v) else v for kk, v in inputs.items()}
        edits = []
        if site is not None and vector is not None:
            pos = positions if isinstance(positions, str) else list(positions)[sl]
            cols = steer_positions(batch.layouts, pads, pos)
            edits.append(steer_edit(site, vector, scales_n[sl], cols, mode))
        with apply_edits(adapter, edits):
            logits = adapter.model(**inputs, logits_to_keep=1, return_dict=True).logits[:, -1].float()
        out.append(torch.log_softmax(logits, -1)[:, ids.to(logits.device)].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(ids)))


def efficacy_from_logprobs(logp_n2: np.ndarray) -> dict[str, np.ndarray]:
    """Per row {'prob': p(tgt), 'share': p(tgt) / (p(src) + p(tgt))} from log-probs [n, 2] (src, tgt)."""
    p = np.exp(logp_n2.astype(np.float64))
    return {"prob": p[:, 1], "share": p[:, 1] / np.maximum(p[:, 0] + p[:, 1], 1e-300)}


def caption_token_ids(adapter, prompt: str, caption: str) -> list[int]:
    """Token ids of `caption` as the answer to the rendered `prompt` (the tokens after their common prefix)."""
    tok = adapter.tokenizer
    text = adapter.render_prompt(prompt)
    a = tok(text, add_special_tokens=False)["input_ids"]
    b = tok(text + caption, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return [int(t) for t in b[k:]]


@torch.no_grad()
def caption_nll(adapter, images, prompts: Sequence[str], captions: Sequence[str], site: str | None = None,
                vector: torch.Tensor | None = None, scales: float | Sequence[float] = 0.0, positions="image",
                mode: str = "prefill", batch_size: int = 16) -> np.ndarray:
    """Mean NLL (nats) per caption token of each (image, prompt, caption[, k]) row, teacher-forced."""
    return caption_nlls(adapter, images, prompts, captions, site, vector, scales, positions, mode, batch_size)[0]


def word_token_ids(adapter, words: Sequence[str]) -> set[int]:
    """Token ids that spell any of `words` (with and without a leading space, any case), to leave out of a caption."""
    tok = adapter.tokenizer
    ids: set[int] = set()
    for w in words:
        for form in {w, w.lower(), w.capitalize()}:
            for text in (form, " " + form):
                ids.update(tok(text, add_special_tokens=False)["input_ids"])
    return ids


def caption_nlls(adapter, images, prompts: Sequence[str], captions: Sequence[str], site: str | None = None,
                 vector: torch.Tensor | None = None, scales: float | Sequence[float] = 0.0, positions="image",
                 mode: str = "prefill", batch_size: int = 16,
                 exclude_ids: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean NLL per caption token, the same over the tokens not in `exclude_ids`) of each row, teacher-forced.

    Leaving out the class words' tokens measures collateral damage: a steered caption that names
    the target instead of the source pays for that word in the first figure, not in the second."""
    from sightline.capture.edit import apply_edits

    n = len(images)
    scales_n = np.broadcast_to(np.asarray(scales, dtype=np.float64), (n,))
    out = np.full(n, np.nan)
    other = np.full(n, np.nan)
    excl = torch.as_tensor(sorted(exclude_ids or ()), dtype=torch.long)
    for k in range(0, n, batch_size):
        idx = range(k, min(k + batch_size, n))
        texts = [adapter.render_prompt(prompts[i]) + captions[i] for i in idx]
        cap_ids = [caption_token_ids(adapter, prompts[i], captions[i]) for i in idx]
        inputs, pads, batch = left_pad(adapter, [images[i] for i in idx], texts)
        inputs = {kk: v.to(adapter.device) if torch.is_tensor(v) else v for kk, v in inputs.items()}
        ids = inputs["input_ids"]
        S = ids.shape[1]
        n_cap = [len(c) for c in cap_ids]
        for j, c in enumerate(cap_ids):  # the caption must be the tail of what the processor fed
            if c and ids[j, S - len(c):].tolist() != c:
                raise ValueError(f"caption tokens of row {k + j} do not end the processed sequence")
        keep = max(n_cap) + 1
        edits = []
        if site is not None and vector is not None:
            # the prefill columns are the prompt's (the caption excluded); every_step adds the caption's
            prompt_layouts = batch.layouts
            pos = positions if isinstance(positions, str) else [positions[i] for i in idx]
            if isinstance(pos, str) and pos in ("text", "all", "last"):
                pos = _prompt_only(prompt_layouts, n_cap, pos)
            cols = steer_positions(prompt_layouts, pads, pos)
            if mode == "every_step":
                cols = [np.union1d(c, np.arange(S - nc, S)) for c, nc in zip(cols, n_cap)]
            edits.append(steer_edit(site, vector, scales_n[k:k + len(idx)], cols, "prefill"))
        with apply_edits(adapter, edits):
            logits = adapter.model(**inputs, logits_to_keep=keep, return_dict=True).logits.float()
        logp = torch.log_softmax(logits, -1)  # columns S-keep .. S-1
        for j, nc in enumerate(n_cap):
            if nc == 0:
                continue
            # token at column c is predicted at column c-1; caption columns are S-nc .. S-1
            pred = logp[j, keep - nc - 1: keep - 1]
            tgt = ids[j, S - nc:].to(pred.device)
            nll_t = -pred.gather(1, tgt[:, None])[:, 0]
            out[k + j] = float(nll_t.mean())
            keep_t = ~torch.isin(tgt, excl.to(tgt.device))
            if bool(keep_t.any()):
                other[k + j] = float(nll_t[keep_t].mean())
    return out, other


def _prompt_only(layouts, n_cap: Sequence[int], which: str) -> list[np.ndarray]:
    """Positions `which` of each example's prompt, leaving out its trailing caption tokens."""
    out = []
    for lay, nc in zip(layouts, n_cap):
        end = len(lay) - nc
        if which == "last":
            out.append(np.array([end - 1]))
        else:
            p = lay.positions(which)
            out.append(p[p < end])
    return out


# ------------------------------------------------------------------------------------ judged swaps
JUDGE_PROMPT = ('Here is what a model answered about an image: "{answer}"\nWhich of these does the answer say the '
                'image shows?\n{options}\nAnswer with the letter only.')
WORLD_JUDGE_PROMPT = "{answer} {question}"
JUDGE_LETTERS = "ABCDEFGH"
JUDGE_FIELDS = ("answer", "question", "options")


def judge_options(classes: Sequence[str], src: str, tgt: str, n_items: int, seed: int = 0,
                  n_options: int = 4) -> list[list[str]]:
    """Per item, the options of its judgement: source, target and n_options - 2 distractors drawn without
    replacement from the other classes (fewer when there are fewer), in an order shuffled per item; drawn
    from numpy's default_rng([seed, crc32("src->tgt"), item]), so the same on every run and machine."""
    others = [c for c in classes if c not in (src, tgt)]
    pair = zlib.crc32(f"{src}->{tgt}".encode())
    out = []
    for i in range(n_items):
        rng = np.random.default_rng([seed, pair, i])
        k = min(max(n_options - 2, 0), len(others))
        picked = [others[j] for j in sorted(rng.choice(len(others), size=k, replace=False))] if k else []
        opts = [src, tgt, *picked]
        out.append([opts[j] for j in rng.permutation(len(opts))])
    return out


def judge_text(template: str, answer: str, question: str, options: Sequence[str]) -> tuple[str, list[str]]:
    """(the judge's prompt, the strings the choice is read over): with {options} in the template the options
    are listed as "A. word" lines and read as letters, else they are read as the words themselves."""
    if "{options}" in template:
        letters = list(JUDGE_LETTERS[: len(options)])
        listed = "\n".join(f"{a}. {w}" for a, w in zip(letters, options))
        return template.format(answer=answer, question=question, options=listed), letters
    return template.format(answer=answer, question=question, options=""), list(options)


def blank_like(image):
    """A uniform grey image of the same size (the judge's image: nothing to see, so only the text decides)."""
    from PIL import Image

    return Image.new("RGB", image.size, (128, 128, 128))


@torch.no_grad()
def judge_answers(adapter, images, answers: Sequence[str], questions: Sequence[str],
                  options: Sequence[Sequence[str]], template: str = JUDGE_PROMPT,
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(chosen option index per row [n], -1 for an empty answer or options that share a first token; the
    options' probabilities renormalised over them [n, n_options], NaN where not judged), the judge being the
    unsteered model reading each answer beside a blank image of `images[row]`'s size (module docstring)."""
    n = len(answers)
    width = max((len(o) for o in options), default=0)
    choice = np.full(n, -1, dtype=np.int64)
    probs = np.full((n, width), np.nan)
    rows, texts, ids = [], [], []
    for r in range(n):
        if not answers[r].strip():
            continue
        text, read = judge_text(template, answers[r], questions[r], options[r])
        first = [caption_token_ids(adapter, text, w)[:1] for w in read]
        if any(not f for f in first) or len({f[0] for f in first}) < len(first):
            continue  # an option adds no token, or two start alike: no choice to read
        rows.append(r)
        texts.append(adapter.render_prompt(text))
        ids.append([f[0] for f in first])
    for k in range(0, len(rows), batch_size):
        sl = rows[k : k + batch_size]
        inputs, _, _ = left_pad(adapter, [blank_like(images[r]) for r in sl], texts[k : k + batch_size])
        inputs = {kk: v.to(adapter.device) if torch.is_tensor(v) else v for kk, v in inputs.items()}
        logits = adapter.model(**inputs, logits_to_keep=1, return_dict=True).logits[:, -1].float()
        logp = torch.log_softmax(logits, -1).cpu().numpy()
        for j, r in enumerate(sl):
            lp = logp[j, ids[k + j]]
            p = np.exp(lp - lp.max())
            probs[r, : len(p)] = p / p.sum()
            choice[r] = int(np.argmax(lp))
    return choice, probs
