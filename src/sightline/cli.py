"""The `sightline` command: one subcommand per job, generated from the job's config dataclass.

Each command is a row of COMMANDS: the config class, the library function it calls and a one-line
summary of the result. Flags, help and defaults come from the config (`sightline.config`): there
is no default here. Modules are imported only for the command being run, so `sightline --help`
answers at once. A user mistake (UserError, or a flag argparse refuses) prints one line and exits
with status 2; anything else is a bug and keeps its traceback. An interrupt (Ctrl-C, SIGTERM) prints
what was kept and exits 130 / 143; a closed stdout (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """A subcommand: `config` and `run` as "module:name" (imported lazily), `show` prints the result."""

    help: str
    config: str | None
    run: str
    show: Callable[[Any, Any], str | None]


def _obj(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _show_extract(cfg, path) -> str:
    from sightline.store import ActivationStore

    s = ActivationStore.open(path)
    text = (f"wrote {path}: {len(s)} examples, {s.n_tokens} tokens, {len(s.sites)} sites"
            + ("" if s.complete else " (incomplete: other ranks still writing, or rerun with --resume)"))
    if s.skipped:  # --skip-bad: say what was left out (the store keeps every skip with its reason)
        first = "; ".join(f"{e.get('path', e['example'])} ({e['reason']})" for e in s.skipped[:3])
        more = f"; and {len(s.skipped) - 3} more" if len(s.skipped) > 3 else ""
        text += (f"\nskipped {len(s.skipped)} unreadable image{'s' if len(s.skipped) > 1 else ''}: {first}{more}"
                 f" (all are recorded in the store: sightline store info {path})")
    return text


def _show_inspect(cfg, info) -> str:
    if cfg.json:
        return json.dumps(info, indent=2)
    from sightline.inspection import format_layout

    return format_layout(info)


def _show_store_info(cfg, info) -> str:
    if cfg.json:
        return json.dumps(info, indent=2)
    from sightline.store.info import format_store_info

    return format_store_info(info)


def _show_json(cfg, res) -> str:
    return json.dumps(res, indent=2)


def _show_probe(cfg, res) -> str:
    return (f"wrote {cfg.out}: best {res['best_site']} top-1 {res['best_top1']:.3f} (control "
            f"{res['best_control_top1']}, selectivity {res['best_selectivity']})")


def _show_steer(cfg, res) -> str:
    from sightline.steer import headline

    h = headline(res)
    return (f"wrote {cfg.out}: best {h['best_site']} k={h['best_scale']}: flip rate {h['flip_rate']}, "
            f"efficacy {h['efficacy']}, unrelated-question accuracy {h['damage_accuracy']}"
            + (f", judged-target rate {h['judged_target_rate']}" if h.get("judged_target_rate") is not None else ""))


def _show_sae_train(cfg, res) -> str | None:
    from sightline.runtime import is_main_process

    if not is_main_process():  # under torchrun, one line from rank 0
        return None
    paths = res["paths"]
    return "trained " + ", ".join(str(p) for p in paths)


def _show_sae_analyze(cfg, res) -> str:
    out = {k: str(res[k]) if k in ("out", "html") else res[k] for k in ("out", "html", "shared_by_layer") if k in res}
    spliced = {s["name"]: (s.get("task_accuracy") or {}).get("all") for s in res.get("saes", [])}
    if any(spliced.values()):  # answer accuracy over every question: clean, SAE spliced in, zeros there
        out["task_accuracy"] = spliced
    return json.dumps(out, indent=2)


def _show_explain_direction(cfg, res) -> str:
    parts = [f"{name} cos@20 {d['cosine_at'].get('20', d['cosine_at'][max(d['cosine_at'], key=int)]):.3f} "
             f"(random {(d['random_cosine_at'] or {}).get('20', float('nan')):.3f})"
             for name, d in res["directions"].items()]
    return f"wrote {cfg.out}: " + "; ".join(parts)


def _show_sparse_probe(cfg, res) -> str:
    curve = ", ".join(f"k={k} {a:.3f}" for k, a in zip(res["ks"], res["top1"]))
    return f"wrote {cfg.out}: {curve}; dense probe on {res['site']} {res['dense_top1']:.3f}"


def _show_keys(cfg, res) -> str:
    n = res["n_flagged"]
    return (f"wrote {cfg.out}: {n['keys']} of {res['n_keys']} image keys input-agnostic post-RoPE, {n['keys_prerope']} "
            f"pre-RoPE (var_ratio < {res['threshold']:g}); blocked {res['n_blocked']}")


def _show_perceive(cfg, res) -> str:
    parts = []
    for task, s in res["tasks"].items():
        b = s.get("best_values") or s.get("best")
        if b is None:
            continue
        ctrl = s.get("control_best_values")
        parts.append(f"{task} {b['rep']} {s['primary_metric']} {b['value']:.3f} (oracle "
                     + (f"{s['oracle']:.3f}" if s.get("oracle") is not None else "n/a")
                     + (f", control {ctrl['value']:.3f}" if ctrl else "") + ")")
    return f"wrote {cfg.out}: " + "; ".join(parts)


def _show_perceive_compare(cfg, res) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    parts = [f"{t} r={f(c['pearson_r'])} rho={f(c['spearman_rho'])} (n={c['n']}, p={f(c['pearson_p'])})"
             for t, c in res["tasks"].items()]
    return f"wrote {cfg.out}: " + "; ".join(parts)


def _show_surfacing(cfg, res) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    parts = [f"{t} answer {f(s.get('answer_accuracy'))}"
             + (f", readout {s['best_rep']} {f(s['readout_accuracy'])}, not surfaced {f(s['present_not_surfaced'])}"
                if s.get("best_rep") else "") for t, s in res["subtasks"].items()]
    parts += [f"{k} answer {f(s['answer_accuracy'])}, probe {s['best_rep']} {f(s['readout_accuracy'])}, not surfaced "
              f"{f(s['present_not_surfaced'])}" for k, s in (res.get("organism") or {}).items()]
    return f"wrote {cfg.out}: " + "; ".join(parts)


def _show_prefix(cfg, res) -> str:
    parts = [f"{t} {k} {s['largest_change']['rep']} {s['largest_change']['change']:+.3f}"
             for t, ts in res["tasks"].items() for k, s in ts["kinds"].items() if s["largest_change"]]
    return f"wrote {cfg.out}: largest change per prefix kind: " + "; ".join(parts)


def _show_path(cfg, res) -> str:
    return str(res)


def _show_trained(cfg, path) -> str:
    return f"trained organism saved to {path}"


def _show_demo(cfg, res) -> None:
    return None  # the demo prints its own progress and where its page is


COMMANDS: dict[str, Command] = {
    "demo": Command("run the whole pipeline on the built-in model, no arguments needed",
                    "sightline.demo:DemoConfig", "sightline.demo:run_demo", _show_demo),
    "extract": Command("capture sites of a dataset into an ActivationStore",
                       "sightline.extract:ExtractConfig", "sightline.extract:extract", _show_extract),
    "inspect": Command("print the token layout of one image in the model's prompt",
                       "sightline.inspection:InspectConfig", "sightline.inspection:inspect_layout", _show_inspect),
    "probe": Command("linear probes for a label at every site and layer of a store",
                     "sightline.probes.run:ProbeConfig", "sightline.probes.run:run_probes", _show_probe),
    "steer": Command("add a class direction at the image tokens; measure efficacy, flips and damage",
                     "sightline.steer.run:SteerConfig", "sightline.steer.run:run_steering", _show_steer),
    "perceive": Command("zero-shot perception readouts (segmentation, correspondence) per layer and KV head",
                        "sightline.perception.run:PerceiveConfig", "sightline.perception.run:run_perceive",
                        _show_perceive),
    "perceive-compare": Command("several models' perception runs: the LM's gain over its input against a score",
                                "sightline.perception.compare:PerceiveCompareConfig",
                                "sightline.perception.compare:compare_perception", _show_perceive_compare),
    "keys": Command("input-agnostic image keys per layer, KV head and position; block them and measure the effects",
                    "sightline.kv.run:KeysConfig", "sightline.kv.run:run_keys", _show_keys),
    "surfacing": Command("perception present in the image representations but not in the answer (BLINK, organism)",
                         "sightline.kv.surfacing:SurfacingConfig", "sightline.kv.surfacing:run_surfacing",
                         _show_surfacing),
    "prefix": Command("text before the image: the change of every perception readout per layer, paired, with intervals",
                      "sightline.kv.prefix:PrefixConfig", "sightline.kv.prefix:run_prefix", _show_prefix),
    "sae train": Command("train one or more SAEs on a site of a store, in one pass (resumable)",
                         "sightline.sae.train:SAETrainConfig", "sightline.sae.train:train_saes", _show_sae_train),
    "sae analyze": Command("metrics by modality, loss recovered, modality sharing, feature pages",
                           "sightline.sae.analyze:SAEAnalyzeConfig", "sightline.sae.analyze:analyze_sae",
                           _show_sae_analyze),
    "sae explain-direction": Command("a class direction's sparse approximation by SAE decoder directions (OMP), "
                                     "beside random directions", "sightline.sae.directions:ExplainDirectionConfig",
                                     "sightline.sae.directions:explain_directions", _show_explain_direction),
    "sae sparse-probe": Command("probes that read only k SAE latents per class, beside the dense residual probe",
                                "sightline.sae.sparse_probe:SparseProbeConfig",
                                "sightline.sae.sparse_probe:run_sparse_probes", _show_sparse_probe),
    "store info": Command("sites, shapes, examples, tokens and completeness of a store",
                          "sightline.store.info:StoreInfoConfig", "sightline.store.info:run_store_info",
                          _show_store_info),
    "organism path": Command("print the shipped organism checkpoint's folder", None,
                             "sightline.organism:checkpoint_path", _show_path),
    "organism eval": Command("accuracy per question type on fresh synthetic scenes, as JSON",
                             "sightline.organism.evaluate:EvalConfig", "sightline.organism.evaluate:run_eval",
                             _show_json),
    "organism train": Command("train an organism from scratch (resumes an interrupted run)",
                              "sightline.organism.train:TrainConfig", "sightline.organism.train:train", _show_trained),
}
GROUPS = {"sae": "sparse autoencoders on image and text tokens: train, analyze, explain-direction, sparse-probe",
          "store": "look at an ActivationStore",
          "organism": "the built-in model organism: path, eval, train"}
PROG = "sightline"
DESCRIPTION = "What a vision-language model's language model knows about its image, and how to edit it."


def _listing(prefix: str = "") -> str:
    rows = [(name[len(prefix):], cmd.help) for name, cmd in COMMANDS.items() if name.startswith(prefix)]
    width = max(len(r[0]) for r in rows) + 2
    return "\n".join(f"  {n.ljust(width)}{h}" for n, h in rows)


def _usage(prefix: str = "") -> str:
    what = f"{PROG} {prefix}".strip()
    return (f"usage: {what} COMMAND [options]   ({what} COMMAND --help for its options)\n\n"
            + (f"{DESCRIPTION}\n\n" if not prefix else "") + f"commands:\n{_listing(prefix)}\n")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors: one line naming the flag, then `--help` as the fix."""

    def error(self, message: str):
        from sightline.errors import UserError

        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser(name: str) -> tuple[argparse.ArgumentParser, type | None]:
    """The parser of one command (e.g. "sae train") and its config class (None: no options)."""
    cmd = COMMANDS[name]
    parser = _Parser(prog=f"{PROG} {name}", description=cmd.help)
    cls = None
    if cmd.config is not None:
        from sightline.config import add_arguments

        cls = _obj(cmd.config)
        add_arguments(parser, cls)
    return parser, cls


def _split(argv: list[str]) -> tuple[str | None, list[str], str]:
    """(command name or None, its arguments, the group prefix typed so far)."""
    if argv and argv[0] in GROUPS:
        group = argv[0]
        if len(argv) > 1 and f"{group} {argv[1]}" in COMMANDS:
            return f"{group} {argv[1]}", argv[2:], ""
        return None, argv[1:], group + " "
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:], ""
    return None, argv, ""


def _print_warnings(result: Any) -> None:
    """The run's summary `warnings` (also in its results.json), one line each on stderr, from one process."""
    summary = getattr(result, "summary", None)
    if not isinstance(summary, dict) or not summary.get("warnings"):
        return
    from sightline.runtime import is_main_process

    if is_main_process():
        for w in summary["warnings"]:
            print(f"{PROG}: warning: {w}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run `sightline ARGS`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest, prefix = _split(argv)
    if name is None:
        if rest[:1] == ["--version"] and not prefix:
            from sightline import __version__

            print(__version__)
            return 0
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage(prefix), end="")
            return 0
        print(_usage(prefix), end="", file=sys.stderr)
        print(f"{PROG}: error: unknown command {(prefix + rest[0]).strip()!r}", file=sys.stderr)
        return 2
    from sightline.errors import Interrupted, UserError

    try:
        parser, cls = build_parser(name)
        ns = parser.parse_args(rest)
        if cls is None:
            cfg = None
            result = _obj(COMMANDS[name].run)()
        else:
            from sightline.config import config_from_args

            cfg = config_from_args(cls, ns)
            result = _obj(COMMANDS[name].run)(cfg)
        text = COMMANDS[name].show(cfg, result)
        if text is not None:
            print(text)
            sys.stdout.flush()  # a closed pipe shows here, where it is caught, not at interpreter exit
        _print_warnings(result)
        return 0
    except UserError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        # extract says what it kept; other commands are resumable by running them again
        print(f"{PROG}: interrupted" + (f": {_one_line(e)}" if str(e) else ""), file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except BrokenPipeError:
        # the reader went away (`sightline store info ... | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _one_line(e: BaseException) -> str:
    """An error message on one line (a message from a library may hold several)."""
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
