"""``aireconstruct federated``: train one model across sites (hospitals) without moving images.

Built on Flower (``flwr``): each site runs a Flower *ClientApp* (:mod:`.federated_site`) next to its
own data set folder and the coordinating server runs a *ServerApp* (this module); only aggregate
statistics and weights travel. The same two apps run in Flower's simulation runtime on one machine
(:func:`simulate`, one virtual site per data set folder) and in a real deployment (SuperLink and
SuperNodes with TLS; docs/federated.md).

The run, from the server's side:

1. *fingerprint* (a query message): each site reports its case count, median spacing and extent,
   channel normalisation and labels; the server checks that the sites agree on channels and labels
   and fixes the plan for everyone (spacing, patch size, normalisation; CT statistics are the
   case-weighted mean of the sites').
2. *rounds* (FedAvg or FedProx): the global weights go to every site, which trains them for
   ``local_iterations`` steps on its own patches (Dice + cross-entropy, AdamW, a poly learning rate
   over all rounds; FedProx adds the proximal term mu/2 ||w - w_global||^2) and sends them back;
   the server averages them weighted by the sites' case counts. With differential privacy each site
   trains by DP-SGD (Opacus): patients are drawn by Poisson sampling, each patient's gradient is
   clipped and Gaussian noise is added, and the server reports every site's privacy budget
   (epsilon at delta, RDP accounting over all its steps; the unit of privacy is one patient).
3. after each round the server may score the global weights on a validation data set (simulation
   and benchmarks only: a real server holds no images); the last weights become a model card.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .dataset import read_dataset
from .errors import InputError
from .federated_site import client_app, plan_network, privacy_spent, site_cases
from .modelcard import CARD_FILE, save_card
from .networks import DEFAULT_ARGUMENTS, check_patch_size, default_patch_size
from .training import mean_dice, validation_dice
from .training_outputs import (WEIGHTS_FILE, check_output_free, log_figures, tensorboard_writer, trained_card,
                               write_weights)

STRATEGIES = ("fedavg", "fedprox")


@dataclass
class FederatedConfig:
    """A federated training run, as the server sees it; recorded in the model card."""

    sites: list  # simulation: one data set folder per virtual site; deployment: the site names
    output: str
    name: str
    title: str = ""
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx only
    rounds: int = 10
    local_iterations: int = 20  # optimisation steps per site and round
    batch_size: int = 2
    learning_rate: float = 2e-3
    architecture: str = "UNet"
    architecture_args: dict | None = None
    spacing: list | None = None  # i, j, k mm; default: the median of the sites' median spacings
    patch_size: list | None = None  # i, j, k voxels; default: from the sites' median extent
    fast_spacing: list | None = None
    mirror_axes: list = field(default_factory=list)
    dp_noise_multiplier: float | None = None  # differential privacy (DP-SGD at every site) when set
    dp_max_grad_norm: float = 1.0  # per-patient gradient clipping
    dp_delta: float = 1e-5
    validation: str | None = None  # a data set the server scores the global weights on
    validate_every: int = 1  # rounds between scorings (the last round is always scored)
    seed: int = 0
    device: str = "cpu"
    intended_use: str = "Research use only; not for clinical use"
    licence: str = "Apache-2.0"

    def __post_init__(self):  # refused before any site or simulation starts
        if self.strategy not in STRATEGIES:
            raise InputError(f"Unknown strategy '{self.strategy}' (known: {', '.join(STRATEGIES)})")
        if self.dp_noise_multiplier and self.strategy == "fedprox":
            raise InputError("FedProx's proximal term is not part of DP-SGD's per-patient gradients: use FedAvg "
                             "with differential privacy")


def make_plan(config: FederatedConfig, fingerprints: list[dict]) -> dict:
    """The training plan every site follows, from the sites' fingerprints and the configuration."""
    first = fingerprints[0]
    for other in fingerprints[1:]:
        if [c["name"] for c in other["channels"]] != [c["name"] for c in first["channels"]]:
            raise InputError("The sites' data sets have different image channels: "
                             f"{[c['name'] for c in first['channels']]} and {[c['name'] for c in other['channels']]}")
        if {e["value"]: e["name"] for e in other["labels"]} != {e["value"]: e["name"] for e in first["labels"]}:
            raise InputError("The sites' data sets name their labels differently; every site needs the same labels")
    weights = np.array([f["cases"] for f in fingerprints], float)
    channels = []
    for index, channel in enumerate(first["channels"]):
        scheme = channel["normalisation"]
        if scheme["scheme"] == "ct":  # the case-weighted mean of the sites' CT statistics
            per_site = [f["channels"][index]["normalisation"] for f in fingerprints]
            scheme = {"scheme": "ct", "clip": [float(np.average([s["clip"][n] for s in per_site], weights=weights))
                                               for n in (0, 1)],
                      **{key: float(np.average([s[key] for s in per_site], weights=weights)) for key in ("mean", "std")}}
        channels.append({"name": channel["name"], "normalisation": scheme})
    spacing = config.spacing or [float(v) for v in np.median([f["spacing"] for f in fingerprints], axis=0)]
    extent = np.median([f["extent_mm"] for f in fingerprints], axis=0)
    patch = config.patch_size or default_patch_size([e / s for e, s in zip(extent, spacing)], config.architecture)
    labels = first["labels"]
    return {"channels": channels, "spacing": spacing, "patch_size": patch, "labels": labels,
            "num_classes": max(e["value"] for e in labels) + 1,
            "architecture": {"name": config.architecture,
                             "args": config.architecture_args or DEFAULT_ARGUMENTS.get(config.architecture, {})},
            "mirror_axes": list(config.mirror_axes), "local_iterations": config.local_iterations,
            "rounds": config.rounds, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "seed": config.seed, "device": config.device,
            "threads": int(os.environ.get("AIRECONSTRUCT_SITE_THREADS", torch.get_num_threads())),
            "privacy": {"noise_multiplier": config.dp_noise_multiplier, "max_grad_norm": config.dp_max_grad_norm,
                        "delta": config.dp_delta} if config.dp_noise_multiplier else None}


def run_server(grid, config: FederatedConfig, progress=None) -> Path:
    """The server's whole run on a Flower ``Grid``: fingerprint, rounds, model card; returns the card."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, FedProx

    progress = progress or (lambda fraction, message: None)
    started = time.time()
    nodes = _wait_for_sites(grid, len(config.sites))
    replies = list(grid.send_and_receive([Message(RecordDict(), node, "query") for node in nodes]))
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed or len(replies) != len(nodes):
        raise InputError(f"A site could not report its data set: {failed[0] if failed else 'no reply'}")
    fingerprints = [json.loads(str(reply.content["fingerprint"]["fingerprint"])) for reply in replies]
    plan = make_plan(config, fingerprints)
    progress(0.0, f"{len(nodes)} sites, {sum(f['cases'] for f in fingerprints)} cases; "
                  f"spacing {plan['spacing']}, patch {plan['patch_size']}")

    torch.manual_seed(config.seed)
    network = plan_network(plan)
    check_patch_size(network, config.architecture, len(plan["channels"]), tuple(plan["patch_size"][::-1]))
    validation = _validation_cases(config.validation, plan)
    history = []
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    board = tensorboard_writer(output)

    def evaluate(server_round: int, arrays) -> MetricRecord:
        row = {"round": server_round, "seconds": round(time.time() - started, 1)}
        if plan["privacy"]:  # the largest privacy budget any site has spent so far
            row["epsilon"] = max(privacy_spent(plan["privacy"], f["cases"], config.batch_size,
                                               server_round * config.local_iterations) for f in fingerprints)
        if validation and (server_round % config.validate_every == 0 or server_round == config.rounds):
            network.load_state_dict(arrays.to_torch_state_dict())
            dice = validation_dice(network, validation, tuple(plan["patch_size"][::-1]), torch.device("cpu"),
                                   plan["num_classes"])
            row["val_mean_dice"] = mean_dice(dice)
        history.append(row)
        log_figures(history, output / "federated_log.csv", board, "round")
        progress(server_round / config.rounds, f"round {server_round}/{config.rounds} "
                                                f"val Dice {row.get('val_mean_dice', '-')}")
        return MetricRecord({key: value for key, value in row.items() if key != "round"})

    strategy_class = FedProx if config.strategy == "fedprox" else FedAvg
    options = {"proximal_mu": config.proximal_mu} if config.strategy == "fedprox" else {}
    strategy = strategy_class(fraction_evaluate=0.0, min_train_nodes=len(nodes), min_available_nodes=len(nodes),
                              **options)
    result = strategy.start(grid, ArrayRecord(network.state_dict()), num_rounds=config.rounds,
                            train_config=ConfigRecord({"plan": json.dumps(plan)}), evaluate_fn=evaluate)
    if board is not None:
        board.close()
    if len(history) != config.rounds + 1:
        raise InputError("Federated training stopped early: a site failed (see the log above)")
    network.load_state_dict(result.arrays.to_torch_state_dict())
    write_weights(network, output / WEIGHTS_FILE)
    config.patch_size, config.architecture_args = plan["patch_size"], plan["architecture"]["args"]
    training = {"federated": {"framework": "Flower", "strategy": config.strategy, "sites": len(nodes),
                              "cases_per_site": {f["site"]: f["cases"] for f in fingerprints}, "rounds": config.rounds,
                              "local_iterations": config.local_iterations},
                "validation_mean_dice": history[-1].get("val_mean_dice"),
                "privacy": plan["privacy"] and {
                    **plan["privacy"], "unit": "patient", "accounting": "RDP (Opacus)",
                    "epsilon_per_site": {f["site"]: round(privacy_spent(plan["privacy"], f["cases"], config.batch_size,
                                                                        config.rounds * config.local_iterations), 3)
                                         for f in fingerprints}},
                "minutes": round((time.time() - started) / 60, 1), "config": asdict(config)}
    card = trained_card(config, output, plan["channels"], plan["labels"], plan["spacing"],
                        f"{config.architecture} trained by aireconstruct federated across {len(nodes)} sites",
                        training)
    save_card(card, output)
    return output / CARD_FILE


def _wait_for_sites(grid, count: int, timeout: float = 600.0) -> list[int]:
    """The node ids of the ``count`` sites, once all have connected."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise InputError(f"Only {len(nodes)} of {count} sites connected within {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


def _validation_cases(folder: str | None, plan: dict) -> list:
    return list(site_cases(str(folder), json.dumps(plan, sort_keys=True))) if folder else []


def server_app(config: FederatedConfig, progress=None):
    """The Flower ServerApp that runs :func:`run_server` with ``config``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_server(grid, config, progress)

    return app


LIST_SETTINGS = ("spacing", "patch_size", "fast_spacing", "mirror_axes")  # "2 2 2" in a Flower run config


def deployment_server_app():
    """The ServerApp of a real deployment (``flwr run``): its settings come from the Flower App's run
    config (``[tool.flwr.app.config]``, keys as :class:`FederatedConfig`'s with dashes), where
    ``sites`` is the number of sites to wait for; lists are written as "2 2 2"."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        settings = {key.replace("-", "_"): value for key, value in context.run_config.items()}
        for key in LIST_SETTINGS:
            if key in settings:
                settings[key] = [float(v) if key.endswith("spacing") else int(v) for v in str(settings[key]).split()]
        sites = [f"site {n}" for n in range(int(settings.pop("sites")))]
        run_server(grid, FederatedConfig(sites=sites, **settings))

    return app


def simulate(config: FederatedConfig, progress=None, overwrite: bool = False) -> Path:
    """Run federated training in Flower's simulation runtime on this machine, one virtual site per
    data set folder in ``config.sites``, one site training at a time; returns the model card. A
    model already in the output folder is replaced only with ``overwrite``."""
    from flwr.simulation import run_simulation

    output = Path(config.output)
    check_output_free(output, overwrite)
    for folder in config.sites:
        read_dataset(folder)  # a missing or empty site fails here, before Ray starts
    (output / CARD_FILE).unlink(missing_ok=True)  # written again when the run finishes
    cpus = os.cpu_count() or 1
    os.environ.setdefault("AIRECONSTRUCT_SITE_THREADS", str(cpus))
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True}}
    run_simulation(server_app(config, progress), client_app([str(Path(s).resolve()) for s in config.sites]),
                   num_supernodes=len(config.sites), backend_config=backend)
    if not (output / CARD_FILE).is_file():
        raise InputError("Federated training did not finish; see the Flower log above")
    return output / CARD_FILE
