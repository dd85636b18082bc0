"""The site's side of federated training (``aireconstruct federated``, see :mod:`.federated`): the
Flower *ClientApp* that runs next to a hospital's data set folder. It reports aggregate statistics
of its data set (never images), then trains the global weights it is sent on its own cases (with
DP-SGD when the plan asks for differential privacy) and sends the new weights back."""

from __future__ import annotations

import json
import random
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .dataset import read_dataset
from .errors import InputError
from .io import read_volume
from .networks import build_network
from .training import segmentation_loss
from .training_data import PatchSampler, channel_normalisation, check_label_values, load_case, median_spacing

DATA_FOLDER_KEY = "data-folder"  # the SuperNode's --node-config entry naming its data set folder


def site_fingerprint(folder: str | Path) -> dict:
    """What a site tells the server about its data set: no images, only aggregate statistics."""
    dataset = read_dataset(folder)
    images = [read_volume(case.images[0]) for case in dataset.cases]
    extents = [np.asarray(image.spacing) * image.array.shape[::-1] for image in images]  # i, j, k mm
    return {"site": Path(folder).name, "cases": len(dataset.cases), "spacing": median_spacing(dataset),
            "extent_mm": [float(v) for v in np.median(extents, axis=0)],
            "channels": channel_normalisation(dataset), "labels": dataset.label_entries}


@lru_cache(maxsize=4)
def site_cases(folder: str, plan_json: str) -> tuple:
    """A site's cases on the plan's grid, loaded once per process (sites keep their actor between rounds)."""
    plan = json.loads(plan_json)
    dataset = read_dataset(folder)
    cases = tuple(load_case(case, plan["channels"], plan["spacing"]) for case in dataset.cases)
    check_label_values([case.case_id for case in dataset.cases], cases, plan["num_classes"])
    return cases


def plan_network(plan: dict) -> torch.nn.Module:
    """The network the plan names, with freshly initialised weights."""
    return build_network(plan["architecture"], len(plan["channels"]), plan["num_classes"])


def train_at_site(folder: str | Path, plan: dict, weights: dict, server_round: int, proximal_mu: float = 0.0,
                  device: str = "cpu") -> tuple[dict, dict]:
    """Train the global ``weights`` for ``plan["local_iterations"]`` steps on the site's cases;
    returns the new weights and the metrics to report (case count, mean loss)."""
    cases = site_cases(str(folder), json.dumps(plan, sort_keys=True))
    seed = plan["seed"] * 100_003 + server_round * 101 + zlib.crc32(Path(folder).name.encode())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    patch_zyx = tuple(plan["patch_size"][::-1])
    sampler = PatchSampler(list(cases), patch_zyx, plan["num_classes"], plan["mirror_axes"])
    sampler.reseed(seed)
    network = plan_network(plan)
    network.load_state_dict(weights)
    network = network.to(device).train()
    anchor = [p.detach().clone() for p in network.parameters()] if proximal_mu > 0 else None
    optimiser = torch.optim.AdamW(network.parameters(), lr=plan["learning_rate"], weight_decay=1e-5)
    privacy = plan.get("privacy")
    if privacy:
        trained, optimiser = _private(network, optimiser, privacy, plan["batch_size"])
        rate, rng = sampling_rate(plan["batch_size"], len(cases)), np.random.default_rng(seed)
    else:
        trained = network
    # with privacy the loss is a mean of per-patient terms, as DP-SGD's per-sample gradients need
    loss_fn = segmentation_loss(plan["architecture"]["args"], batch=not privacy)
    steps, total = plan["local_iterations"], plan["local_iterations"] * plan["rounds"]
    losses = []
    for step in range((server_round - 1) * steps, server_round * steps):
        for group in optimiser.param_groups:
            group["lr"] = plan["learning_rate"] * (1 - step / total) ** 0.9
        optimiser.zero_grad(set_to_none=True)
        if privacy:
            chosen = np.flatnonzero(rng.random(len(cases)) < rate).tolist()  # Poisson sampling of patients
            if not chosen:  # nobody drawn: the step is noise only
                for parameter in trained.parameters():
                    parameter.grad_sample = torch.zeros((0, *parameter.shape), device=parameter.device)
                optimiser.step()
                continue
            images, targets = sampler.patches(chosen, device)
        else:
            images, targets = sampler.batch(plan["batch_size"], device)
        loss = loss_fn(trained(images), targets)
        if anchor is not None:  # FedProx: stay near the global weights
            loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(network.parameters(), anchor))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    state = {key: value.detach().cpu() for key, value in network.state_dict().items()}
    return state, {"num-examples": len(cases), "train-loss": float(np.mean(losses)) if losses else 0.0}


def sampling_rate(batch_size: int, cases: int) -> float:
    """The chance that a patient is in one DP-SGD step (Poisson sampling, ``batch_size`` expected)."""
    return min(1.0, batch_size / cases)


def _private(network, optimiser, privacy: dict, batch_size: int):
    """Opacus's per-patient gradients and DP-SGD optimiser around a network and its optimiser."""
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ModuleNotFoundError:
        raise InputError("Differential privacy needs Opacus: pip install opacus") from None
    return GradSampleModule(network), DPOptimizer(optimiser, noise_multiplier=privacy["noise_multiplier"],
                                                  max_grad_norm=privacy["max_grad_norm"],
                                                  expected_batch_size=batch_size)


def privacy_spent(privacy: dict, cases: int, batch_size: int, steps: int) -> float:
    """A site's epsilon (at ``privacy["delta"]``) after ``steps`` DP-SGD steps, by RDP accounting."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(privacy["noise_multiplier"], sampling_rate(batch_size, cases), steps)]
    return float(accountant.get_epsilon(privacy["delta"]))


def client_app(sites: list[str] | None = None):
    """The Flower ClientApp of a site. Its data set folder is the SuperNode's ``data-folder`` node
    setting, or in a simulation ``sites[partition-id]``."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def folder_of(context) -> str:
        if DATA_FOLDER_KEY in context.node_config:
            return str(context.node_config[DATA_FOLDER_KEY])
        return sites[int(context.node_config["partition-id"])]

    @app.query()
    def fingerprint(message: Message, context) -> Message:
        record = ConfigRecord({"fingerprint": json.dumps(site_fingerprint(folder_of(context)))})
        return Message(RecordDict({"fingerprint": record}), reply_to=message)

    @app.train()
    def train(message: Message, context) -> Message:
        config = message.content["config"]
        plan = json.loads(str(config["plan"]))
        torch.set_num_threads(max(1, int(plan.get("threads", 1))))
        weights = message.content["arrays"].to_torch_state_dict()
        state, metrics = train_at_site(folder_of(context), plan, weights, int(config["server-round"]),
                                       float(config.get("proximal-mu", 0.0)), plan["device"])
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app
