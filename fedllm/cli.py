"""`fedllm ...`: prepare models, inspect runs, generate with a trained adapter.

Every `FedllmError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.errors import FedllmError, RunDirError

if TYPE_CHECKING:
    from fedllm.secure.at_rest import AtRestKey

__all__ = ["main"]

AT_REST_HELP = "the at-rest key file, if not the one the run's security.at-rest-key names"


def _load_run(run_dir: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    path = Path(run_dir)
    summary_file, config_file = path / "summary.json", path / "config.json"
    if not config_file.is_file():
        raise RunDirError(f"{path} is not a fedllm run directory (no config.json).")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not summary_file.is_file():
        raise RunDirError(f"run {path} has no summary.json yet: no round has completed.")
    return path, config, json.loads(summary_file.read_text(encoding="utf-8"))


def _at_rest(args: argparse.Namespace, run: Path) -> AtRestKey | None:
    """The key that opens a run's sealed checkpoints and ledgers: `--at-rest-key`, else the
    run's own security.at-rest-key (from its config.json); None when the run is not sealed."""
    from fedllm.secure.at_rest import configured_key

    if args.at_rest_key:
        return configured_key(args.at_rest_key, what="the at-rest key (--at-rest-key)")
    config_file = run / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    setting = config.get("config", {}).get("security", {}).get("at_rest_key", "")
    return configured_key(
        setting,
        what=f"the at-rest key that {config_file} names (security.at-rest-key; pass "
        "--at-rest-key PATH if you hold it elsewhere)",
    )


def cmd_runs_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedllm.summary import render_table

    path, _, summary = _load_run(args.run)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console = Console()
    console.print(render_table(summary))
    console.print(f"run directory: {path}")
    console.print(
        f"status: {summary['status']}"
        + (f" ({summary['stop_reason']})" if summary.get("stop_reason") else "")
    )
    losses = ", ".join(f"{x:.4f}" for x in summary["eval_loss"] if x is not None)
    console.print(f"global eval loss by round: {losses}")
    if summary["bytes_per_round"]:
        b = summary["bytes_per_round"][-1]
        console.print(f"bytes last round: up {b['up']:,}, down {b['down']:,}")
    for item in summary.get("rejected_updates", []) + summary.get("failures", []):
        console.print(
            f"[yellow]round {item['round']}: {item.get('sender', item.get('node'))}: "
            f"{item['reason']}[/yellow]"
        )
    if ckpt := summary.get("adapter", {}).get("final_checkpoint"):
        console.print(f"final adapter: {ckpt}")
    return 0


def cmd_runs_plot(args: argparse.Namespace) -> int:
    from fedllm.plots import plot_run

    path, _, summary = _load_run(args.run)
    print(plot_run(summary, Path(args.out) if args.out else path / "progress.png"))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 only if every ledger of the run has an intact chain and every ε recomputes."""
    from fedllm.privacy.ledger import Ledger
    from fedllm.privacy.verify import verify_records

    path = Path(args.run)
    ledgers = [path / "ledger.jsonl", *sorted(path.glob("sites/*/ledger.jsonl"))]
    ledgers = [p for p in ledgers if p.is_file()]
    if not ledgers:
        raise RunDirError(f"{path} holds no privacy ledger (ledger.jsonl).")
    failed = False
    key = _at_rest(args, path)
    for ledger_path in ledgers:
        records = Ledger(ledger_path, key=key).records()
        problems = verify_records(records)
        for problem in problems:
            print(f"FAIL {ledger_path}: {problem}")
        if problems:
            failed = True
        else:
            print(
                f"OK   {ledger_path}: {len(records)} records, hash chain intact, "
                "every epsilon recomputed (RDP, PRV, PLD)"
            )
    return 1 if failed else 0


def cmd_audit_report(args: argparse.Namespace) -> int:
    from fedllm.privacy.audit.report import build_report

    path, _, _ = _load_run(args.run)
    html_path, md_path, problems = build_report(path, at_rest=_at_rest(args, path))
    print(f"wrote {html_path}\nwrote {md_path}")
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


def cmd_audit_canaries(args: argparse.Namespace) -> int:
    """Score an auditing run's canaries; exit 1 (after writing) if a bound beats the proof."""
    from fedllm.privacy.audit.empirical import AUDIT_FILE, AuditBugError, audit_run

    path, config, summary = _load_run(args.run)
    try:
        result = audit_run(
            path, _run_config(config), summary, device=args.device, at_rest=_at_rest(args, path)
        )
    except AuditBugError as e:
        print(f"BUG: {e}", file=sys.stderr)
        return 1
    proven = result["proven_epsilon"]
    print(
        f"site {result['site']}: proven epsilon {proven if proven is not None else 'none'} "
        f"({result['proven_from']}), delta {result['delta']:.3g}"
    )
    for kind in ("gradient_canaries", "membership"):
        if kind in result:
            r = result[kind]
            print(
                f"  {kind}: {r['correct']}/{r['guesses']} guesses right (k={r['k']}) -> "
                f"epsilon lower bound {r['epsilon_lower_bound']:.4f} at 95% confidence"
            )
    for secret in result.get("secrets", []):
        print(
            f"  secret of {secret['name']} (x{secret['repeats']}): exposure "
            f"{secret['trained']['exposure_extrapolated']:.2f} bits trained vs "
            f"{secret['base']['exposure_extrapolated']:.2f} base"
        )
    print(f"status: {result['status']}; wrote {path / AUDIT_FILE}")
    return 0


def _run_config(config: dict[str, Any]) -> Any:
    from fedllm.config import flatten, parse_config

    return parse_config(flatten(config["config"]))


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from fedllm.model import (
        ADAPTER_FILE,
        load_base_model,
        load_peft_model,
        load_tokenizer,
        pick_device,
        resolve_model_dir,
    )
    from fedllm.secure.at_rest import SUFFIX, stored_file

    path, config, summary = _load_run(args.run)
    cfg = _run_config(config)
    ckpt = args.adapter or summary.get("adapter", {}).get("final_checkpoint")
    if not ckpt or not Path(ckpt).is_dir():
        raise RunDirError(f"run {path} has no adapter checkpoint; train at least one round.")
    stored = stored_file(Path(ckpt) / ADAPTER_FILE)
    if stored is None:
        raise RunDirError(
            f"{ckpt} holds no peft adapter (an HE run's adapter is CKKS-encrypted): decrypt it "
            f"at a site with `fedllm he decrypt {args.run} --out DIR`, then pass --adapter DIR."
        )
    # The run's own checkpoint is opened strictly under the run's key; an --adapter directory
    # is taken as it is, and needs a key only if it is sealed.
    sealed = stored.name.endswith(SUFFIX)
    key = _at_rest(args, path) if sealed or not args.adapter else None
    device = pick_device(args.device, setting="--device")
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model), cfg.model)
    model = load_peft_model(load_base_model(cfg.model, device), Path(ckpt), at_rest=key)
    model.eval()
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = {k: v.to(device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return 0


def cmd_keys_he_init(args: argparse.Namespace) -> int:
    from fedllm.config import parse_config
    from fedllm.secure.he import KEY_FILE, PUBLIC_CONTEXT, SECRET_CONTEXT, write_key_files

    cfg = parse_config(
        {
            "he.poly-modulus-degree": args.poly_modulus_degree,
            "he.coeff-mod-bit-sizes": args.coeff_mod_bit_sizes,
            "he.scale-bits": args.scale_bits,
        }
    )
    out = Path(args.out)
    info = write_key_files(cfg.he.params, out, force=args.force)
    print(f"CKKS key {info['key_id']}")
    print(
        f"  N={info['poly_modulus_degree']}, primes {info['coeff_mod_bit_sizes']} bits, "
        f"scale 2^{info['scale_bits']}"
    )
    print(f"  {out / SECRET_CONTEXT}  (0600) sites only: hand over out of band")
    print(f"  {out / PUBLIC_CONTEXT}  the coordinator: can add ciphertexts, cannot decrypt")
    print(f"  {out / KEY_FILE}  parameters and key id")
    return 0


def cmd_keys_at_rest_init(args: argparse.Namespace) -> int:
    from fedllm.secure.at_rest import make_key_file

    key = make_key_file(Path(args.out), force=args.force)
    print(f"at-rest key {key.id} written to {args.out} (0600, 32 random bytes)")
    print(
        f'  run with security.at-rest-key = "{args.out}": checkpoints and ledgers are then '
        "sealed (AES-256-GCM); keep a copy, without it they cannot be read"
    )
    return 0


def cmd_he_decrypt(args: argparse.Namespace) -> int:
    from fedllm.model import save_peft_adapter
    from fedllm.secure.he_site import decrypt_adapter

    path, config, summary = _load_run(args.run)
    cfg = _run_config(config)
    if cfg.strategy.secure_aggregation != "he":
        raise RunDirError(f"run {path} did not aggregate under HE; its adapter is plaintext.")
    if args.checkpoint:
        ckpt = path / "checkpoints" / args.checkpoint
    else:
        ckpt = Path(summary.get("adapter", {}).get("final_checkpoint") or path / "none")
    key = _at_rest(args, path)
    arrays, facts = decrypt_adapter(cfg, ckpt, args.context or cfg.he.site_context, at_rest=key)
    out = Path(args.out or f"{cfg.run.name}-{ckpt.name}-adapter")
    # Under an at-rest key the decrypted adapter is sealed too: never a silent plaintext copy.
    save_peft_adapter(out, arrays, model_cfg=cfg.model, lora_cfg=cfg.lora, at_rest=key)
    print(
        f"decrypted {ckpt} ({facts['ciphertexts']} ciphertexts, key {facts['key_id'][:12]}..., "
        f"total weight {facts['total_weight']:g}; every check slot verified)"
    )
    sealed = (
        f", sealed under at-rest key {key.id} (fedllm generate --adapter opens it)" if key else ""
    )
    print(f"peft adapter written to {out}{sealed}")
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from fedllm.config import ModelConfig
    from fedllm.model import resolve_model_dir

    cfg = ModelConfig(name=args.name, gguf_file=args.gguf_file)
    print(resolve_model_dir(cfg))
    return 0


def cmd_config_keys(_: argparse.Namespace) -> int:
    from fedllm.config import known_keys

    for key, (typ, f) in known_keys().items():
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        print(f"{key} ({typ.__name__}, default {f.default!r}){extra}: {f.metadata['help']}")
    return 0


def cmd_federation_setup(args: argparse.Namespace) -> int:
    """Add a local simulation federation of `--sites` sites to Flower's own config file.

    Written with Flower's config helpers into ``$FLWR_HOME/config.toml`` (fedllm keeps no
    federation settings of its own). The connection carries its simulation options, so every
    `flwr run .` gets the same federation even after its local SuperLink restarts (a size
    set with `flwr federation simulation-config` lives in the SuperLink and is lost then).
    It becomes the default only when the default is still Flower's stock `local`.
    """
    from flwr.cli.flower_config import (
        init_flwr_config,
        read_flower_config,
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import (
        SimulationBackendConfig,
        SimulationClientResources,
        SuperLinkConnection,
        SuperLinkSimulationOptions,
    )

    init_flwr_config()
    connection = SuperLinkConnection(
        name=args.name,
        address=":local:",
        options=SuperLinkSimulationOptions(
            num_supernodes=args.sites,
            backend=SimulationBackendConfig(
                client_resources=SimulationClientResources(num_cpus=args.cpus, num_gpus=0.0)
            ),
        ),
    )
    write_superlink_connection(connection)
    config, path = read_flower_config()
    default = config.get("superlink", {}).get("default")
    if default in (None, "local") or args.make_default:
        set_default_superlink_connection(args.name)
        default = args.name
    print(
        f"Flower connection '{args.name}' ({args.sites} simulated sites, {args.cpus} CPUs each) "
        f"written to {path}; default connection: '{default}'."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedllm.cli_deploy import add_deploy_parsers, add_federation_parser
    from fedllm.cli_safety import add_safety_parsers
    from fedllm.config import HEConfig

    parser = argparse.ArgumentParser(prog="fedllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    runs = sub.add_parser("runs", help="inspect run directories").add_subparsers(
        dest="runs_command", required=True
    )
    show = runs.add_parser("show", help="print a run's summary")
    show.add_argument("run", help="outputs/<run-name>")
    show.add_argument("--json", action="store_true", help="print summary.json as is")
    show.set_defaults(func=cmd_runs_show)
    plot = runs.add_parser("plot", help="draw held-out loss and epsilon per site and round")
    plot.add_argument("run", help="outputs/<run-name>")
    plot.add_argument("--out", help="PNG path (default: <run>/progress.png)")
    plot.set_defaults(func=cmd_runs_plot)

    gen = sub.add_parser("generate", help="answer a prompt with the base model + final adapter")
    gen.add_argument("prompt")
    gen.add_argument("--run", required=True, help="outputs/<run-name>")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    gen.add_argument("--adapter", help="a peft adapter directory instead of the run's last")
    gen.add_argument("--at-rest-key", help=AT_REST_HELP)
    gen.set_defaults(func=cmd_generate)

    keys = sub.add_parser("keys", help="key ceremonies").add_subparsers(
        dest="keys_command", required=True
    )
    he_init = keys.add_parser(
        "he-init",
        help="make the CKKS keys: a secret context for sites, a public one for the server",
    )
    he_init.add_argument("--out", default="keys/he", help="directory for the key files")
    he_defaults = HEConfig()  # the run config's defaults, so keys and runs agree
    he_init.add_argument("--poly-modulus-degree", type=int, default=he_defaults.poly_modulus_degree)
    he_init.add_argument("--coeff-mod-bit-sizes", default=he_defaults.coeff_mod_bit_sizes)
    he_init.add_argument("--scale-bits", type=int, default=he_defaults.scale_bits)
    he_init.add_argument("--force", action="store_true", help="overwrite existing keys")
    he_init.set_defaults(func=cmd_keys_he_init)
    at_rest_init = keys.add_parser(
        "at-rest-init", help="make the key that seals checkpoints and ledgers at rest"
    )
    at_rest_init.add_argument("--out", default="keys/at-rest.key", help="the key file (0600)")
    at_rest_init.add_argument("--force", action="store_true", help="overwrite an existing key")
    at_rest_init.set_defaults(func=cmd_keys_at_rest_init)

    he = sub.add_parser("he", help="homomorphic aggregation").add_subparsers(
        dest="he_command", required=True
    )
    dec = he.add_parser("decrypt", help="decrypt an HE run's adapter (at a site) to peft format")
    dec.add_argument("run", help="outputs/<run-name> (a copy of the coordinator's run dir)")
    dec.add_argument("--context", help="the site's secret.context (default: he.site-context)")
    dec.add_argument("--checkpoint", help="round-N under checkpoints/ (default: the last)")
    dec.add_argument("--out", help="adapter directory (default: ./<run>-<round>-adapter)")
    dec.add_argument("--at-rest-key", help=AT_REST_HELP)
    dec.set_defaults(func=cmd_he_decrypt)

    model = sub.add_parser("model", help="base models").add_subparsers(
        dest="model_command", required=True
    )
    prep = model.add_parser("prepare", help="cache a model (GGUF -> safetensors) for fast loads")
    prep.add_argument("--name", default="embedded:smollm2-135m-instruct")
    prep.add_argument("--gguf-file", default="")
    prep.set_defaults(func=cmd_model_prepare)

    audit = sub.add_parser("audit", help="privacy audits").add_subparsers(
        dest="audit_command", required=True
    )
    verify = audit.add_parser("verify", help="check the ledgers' hash chains and recompute every ε")
    verify.add_argument("run", help="outputs/<run-name>")
    verify.add_argument("--at-rest-key", help=AT_REST_HELP)
    verify.set_defaults(func=cmd_audit_verify)
    report = audit.add_parser("report", help="write audit-report.html and .md into the run")
    report.add_argument("run", help="outputs/<run-name>")
    report.add_argument("--at-rest-key", help=AT_REST_HELP)
    report.set_defaults(func=cmd_audit_report)
    canaries = audit.add_parser(
        "canaries", help="score an auditing run's canaries: empirical epsilon lower bound"
    )
    canaries.add_argument("run", help="outputs/<run-name> of a run with audit.* canaries")
    canaries.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    canaries.add_argument("--at-rest-key", help=AT_REST_HELP)
    canaries.set_defaults(func=cmd_audit_canaries)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True
    )
    config.add_parser("keys", help="list every run-config key").set_defaults(func=cmd_config_keys)

    fed = sub.add_parser("federation", help="Flower federations").add_subparsers(
        dest="federation_command", required=True
    )
    setup = fed.add_parser("setup", help="add a local simulation federation to Flower's config")
    setup.add_argument("--sites", type=int, default=3)
    setup.add_argument("--cpus", type=int, default=2, help="CPUs per simulated site")
    setup.add_argument("--name", default="fedllm-local", help="Flower connection name")
    setup.add_argument(
        "--make-default", action="store_true", help="make it the default even over a custom one"
    )
    setup.set_defaults(func=cmd_federation_setup)
    add_federation_parser(fed)
    add_deploy_parsers(sub)
    add_safety_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FedllmError as e:
        print(f"fedllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
