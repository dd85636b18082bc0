"""Federated training with Flower: the plan the server makes from the sites' fingerprints, FedProx's
proximal term, and a whole simulated run of three sites whose first round is checked against
FedAvg computed by hand from each site's own training."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="Flower (flwr[simulation]) is not installed")

from AIReconstructLib.cli import main  # noqa: E402
from AIReconstructLib.dataset import write_phantom_dataset  # noqa: E402
from AIReconstructLib.errors import InputError  # noqa: E402
from AIReconstructLib.federated import FederatedConfig, make_plan, simulate  # noqa: E402
from AIReconstructLib.federated_site import plan_network, privacy_spent, site_fingerprint, train_at_site  # noqa: E402
from AIReconstructLib.modelcard import load_card  # noqa: E402
from conftest import tensorboard_scalars  # noqa: E402

TINY_UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 0}
SPACING = (8.0, 8.0, 8.0)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    counts = (1, 2, 1)
    folders = [str(write_phantom_dataset(root / f"site_{n}", count, 700 + 10 * n, SPACING).folder)
               for n, count in enumerate(counts)]
    validation = str(write_phantom_dataset(root / "validation", 1, 800, SPACING).folder)
    return root, folders, validation


def _config(root, folders, **changes) -> FederatedConfig:
    return FederatedConfig(**{"sites": folders, "output": str(root / "out"), "name": "federated-test", "rounds": 2,
                              "local_iterations": 2, "architecture_args": TINY_UNET, "patch_size": [32, 32, 32],
                              **changes})


def test_the_plan_combines_the_sites_statistics_and_refuses_sites_that_disagree(sites):
    root, folders, _ = sites
    fingerprints = [site_fingerprint(folder) for folder in folders]
    assert [f["cases"] for f in fingerprints] == [1, 2, 1]
    assert "images" not in json.dumps(fingerprints)  # aggregate statistics only
    plan = make_plan(_config(root, folders, patch_size=None), fingerprints)
    means = [f["channels"][0]["normalisation"]["mean"] for f in fingerprints]
    assert plan["channels"][0]["normalisation"]["mean"] == pytest.approx(np.average(means, weights=[1, 2, 1]))
    assert plan["spacing"] == list(SPACING) and plan["num_classes"] == 10
    assert all(16 <= p <= 128 and p % 16 == 0 for p in plan["patch_size"])
    other = json.loads(json.dumps(fingerprints[1]))
    other["labels"][0]["name"] = "hepar"
    with pytest.raises(InputError, match="name their labels differently"):
        make_plan(_config(root, folders), [fingerprints[0], other])
    other = json.loads(json.dumps(fingerprints[1]))
    other["channels"][0]["name"] = "MR"
    with pytest.raises(InputError, match="different image channels"):
        make_plan(_config(root, folders), [fingerprints[0], other])


def test_fedprox_keeps_a_site_near_the_global_weights(sites):
    root, folders, _ = sites
    plan = make_plan(_config(root, folders, learning_rate=0.05), [site_fingerprint(f) for f in folders])
    torch.manual_seed(0)
    start = plan_network(plan).state_dict()

    def distance(mu):
        state, metrics = train_at_site(folders[1], plan, start, 1, proximal_mu=mu)
        assert metrics["num-examples"] == 2 and np.isfinite(metrics["train-loss"])
        return sum(float(((state[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    assert distance(100.0) < 0.7 * distance(0.0)


def test_a_simulated_federation_averages_the_sites_weights_and_writes_a_card(sites):
    root, folders, validation = sites
    config = _config(root, folders, rounds=1, validation=validation)
    assert main(["federated", *folders, "-o", config.output, "--name", config.name, "--rounds", "1",
                 "--local-iterations", "2", "--patch-size", "32", "32", "32", "--validation", validation,
                 "--architecture-args", json.dumps(TINY_UNET)]) == 0
    card = load_card(root / "out" / "card.json")  # validated, checksum checked
    assert main(["federated", *folders, "-o", config.output, "--name", config.name]) == 2  # kept, not replaced
    assert load_card(root / "out" / "card.json").data == card.data
    federated = card.data["training"]["federated"]
    assert federated["sites"] == 3 and federated["cases_per_site"] == {"site_0": 1, "site_1": 2, "site_2": 1} and federated["strategy"] == "fedavg"
    assert card.data["training"]["validation_mean_dice"] is not None
    log = (root / "out" / "federated_log.csv").read_text().splitlines()
    assert log[0].startswith("round") and len(log) == 3  # header, round 0 (initial weights), round 1
    assert [event.step for event in tensorboard_scalars(root / "out" / "tensorboard", "val_mean_dice")] == [0, 1]

    # FedAvg by hand: each site trains the same initial weights on its own; average by case count
    plan = make_plan(config, [site_fingerprint(f) for f in folders])
    torch.manual_seed(config.seed)
    start = plan_network(plan).state_dict()
    threads = torch.get_num_threads()
    torch.set_num_threads(plan["threads"])  # as many as each site's process trained with: Adam's first steps
    try:                                    # amplify the rounding differences of another count
        trained = [train_at_site(folder, plan, start, 1)[0] for folder in folders]
    finally:
        torch.set_num_threads(threads)
    expected = {k: sum(w * s[k] for w, s in zip((1, 2, 1), trained)) / 4 for k in start}
    weights = load_file(str(card.weight_paths[0]))
    for key in expected:
        np.testing.assert_allclose(weights[key].numpy(), expected[key].numpy(), atol=1e-5)


def test_a_site_without_a_data_set_stops_the_run_before_any_training(sites, tmp_path):
    _, folders, _ = sites
    with pytest.raises(InputError, match="missing is not a data set"):
        simulate(_config(tmp_path, [folders[0], str(tmp_path / "missing")]))
    assert not (tmp_path / "out").exists()


def test_differential_privacy_reports_each_sites_budget(sites, tmp_path):
    _, folders, _ = sites
    config = _config(tmp_path, folders, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, batch_size=1)
    card = load_card(simulate(config))
    privacy = card.data["training"]["privacy"]
    assert privacy["unit"] == "patient" and privacy["delta"] == 1e-5
    spent = privacy["epsilon_per_site"]
    steps = config.rounds * config.local_iterations
    assert spent["site_1"] == pytest.approx(privacy_spent(privacy, 2, config.batch_size, steps), abs=1e-3)
    assert spent["site_1"] < spent["site_0"] == spent["site_2"]  # more patients, less spent each
    epsilons = [float(row.split(",")[-1]) for row in (tmp_path / "out" / "federated_log.csv").read_text().split()[2:]]
    assert len(epsilons) == 2 and epsilons[0] < epsilons[1] == pytest.approx(max(spent.values()), abs=1e-3)
    with pytest.raises(InputError, match="use FedAvg with differential privacy"):
        simulate(_config(tmp_path, folders, dp_noise_multiplier=1.0, strategy="fedprox"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def _run_status(bin_folder: Path, env: dict, run_output: str) -> str:
    """The SuperLink's status of the run that ``flwr run`` printed it started, with its details."""
    started = re.search(r"Successfully started run (\d+)", run_output)
    if not started:
        return "not started"
    listing = subprocess.run([bin_folder / "flwr", "ls", "test", "--run-id", started[1], "--format", "json"], env=env,
                             capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    try:
        run = json.loads(listing.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return f"unknown ({listing.stdout[-500:]} {listing.stderr[-500:]})"
    return f"{run['status']} {run['status-details']}"


def test_the_flower_app_runs_on_a_real_superlink_with_three_supernodes(sites, tmp_path):
    """The deployment path of docs/federated.md on one machine: a SuperLink, one SuperNode process per
    site naming its data folder, and ``flwr run`` of the project's Flower App (without TLS here)."""
    _, folders, _ = sites
    bin_folder = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}"}
    link = _free_port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ["superlink", *(f"supernode{n}" for n in range(3))]}
    processes = [subprocess.Popen([bin_folder / "flower-superlink", "--insecure", "--port", str(link),
                                   "--disable-runtime-dependency-installation"], env=env, cwd=tmp_path,
                                  stdout=logs["superlink"], stderr=subprocess.STDOUT)]
    try:
        _wait_for_port(link)
        for n, folder in enumerate(folders):
            processes.append(subprocess.Popen(
                [bin_folder / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                 "--port", str(_free_port()), "--node-config", f'data-folder="{folder}"'],
                env=env, cwd=tmp_path, stdout=logs[f"supernode{n}"], stderr=subprocess.STDOUT))
        output = tmp_path / "model"
        for _ in range(2):  # a second run only where the SuperLink lost the ServerApp's heartbeat (a loaded machine)
            run = subprocess.run(
                [bin_folder / "flwr", "run", str(Path(__file__).parents[1] / "federation"), "test", "--stream",
                 "--run-config", f'sites=3 rounds=1 local-iterations=1 output="{output}" name="deployed" '
                                 'patch-size="32 32 32" spacing="8 8 8"'],
                env=env, cwd=tmp_path, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
            status = _run_status(bin_folder, env, run.stdout)
            if "No heartbeat" not in status:
                break
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        for log in logs.values():
            log.close()
    assert (output / "card.json").is_file(), "\n".join(
        [f"flwr run exited with {run.returncode}; the run: {status}", run.stdout[-3000:], run.stderr[-3000:]] +
        [f"--- {name}:\n" + (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:] for name in logs])
    card = load_card(output / "card.json")
    assert card.name == "deployed" and card.data["training"]["federated"]["cases_per_site"] == \
        {"site_0": 1, "site_1": 2, "site_2": 1}
